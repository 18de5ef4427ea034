"""Train a tiny GPT with DistributedDataParallel, its activations offloaded by fxoffload.

What it shows: offloading composes with torch.distributed. Each rank wraps
the model in ``DistributedDataParallel`` and compiles the wrapper with
``torch.compile(ddp_model, backend="ssdtrain")``; Dynamo's DDPOptimizer splits
the graph at gradient-bucket boundaries, each piece is compiled by the
backend, and in backward the reads of offloaded activations overlap the
bucket allreduces. Each rank writes under its own
``fxoffload-rank<R>-<pid>-XXXX`` directory of ``offload_dir`` (on a node,
the ranks share it), removed at exit.

The model is the one of ``train_tiny_gpt.py`` (next to this file). Each rank
trains on its own fixed batch of random tokens (seeded by its rank), so the
ranks' gradients differ and the allreduce matters. Backend: gloo on CPU, NCCL
with one GPU per rank when CUDA is available.

At the end rank 0 prints, for every rank, the bytes it offloaded per step and
its median step time (the first step, which compiles, is left out).

Run it (after ``pip install .`` in the repository)::

    torchrun --nproc-per-node 2 examples/train_ddp.py
    torchrun --nproc-per-node 2 examples/train_ddp.py --steps 20 --offload-dir /nvme/scratch
    torchrun --nproc-per-node 2 examples/train_ddp.py --policy none   # nothing offloaded

On several nodes, give each node's ranks a local directory: ``--offload-dir``
(or ``FXOFFLOAD_DIR``) is a path on the node that runs the rank.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from train_tiny_gpt import GPTConfig, TinyGPT

import fxoffload

MIB = 1 << 20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    parser.add_argument(
        "--batch-size", type=int, default=12, help="sequences per rank and step (default 12)"
    )
    parser.add_argument(
        "--offload-dir",
        help="directory for the offload files, local to each node "
        "(default: $FXOFFLOAD_DIR, else the temp dir)",
    )
    parser.add_argument("--compiler", choices=["inductor", "aot_eager"], default="inductor")
    parser.add_argument(
        "--policy",
        default="all",
        help='what to offload: "all" (default), "none" (the baseline: same compile, nothing '
        "offloaded), or any other policy fxoffload accepts",
    )
    parser.add_argument(
        "--bucket-cap-mb",
        type=float,
        default=25.0,
        help="DDP gradient bucket size in MiB; DDPOptimizer compiles one graph per bucket "
        "(default 25, DDP's own)",
    )
    return parser.parse_args()


def setup() -> torch.device:
    """Join the job torchrun started: NCCL and this rank's GPU, or gloo on the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def main() -> None:
    args = parse_args()
    device = setup()
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    cfg = GPTConfig()
    model = TinyGPT(cfg).to(device)
    options: dict[str, str] = {"compiler": args.compiler, "policy": args.policy}
    if args.offload_dir is not None:
        options["offload_dir"] = args.offload_dir
    ddp_model = DDP(model, bucket_cap_mb=args.bucket_cap_mb)
    compiled = torch.compile(ddp_model, backend="ssdtrain", options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    # This rank's fixed batch: next-token targets are the inputs shifted by one.
    tokens = torch.Generator().manual_seed(1000 + rank)
    shape = (args.batch_size, cfg.block_size + 1)
    data = torch.randint(0, cfg.vocab_size, shape, generator=tokens).to(device)
    idx, targets = data[:, :-1], data[:, 1:]

    if rank == 0:
        print(
            f"TinyGPT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
            f"{world} ranks ({dist.get_backend()}), batch {args.batch_size}x{cfg.block_size} "
            f"per rank, compiler={args.compiler}, policy={args.policy}",
            flush=True,
        )
    step_seconds, step_bytes = [], []
    for step in range(1, args.steps + 1):
        before = fxoffload.stats().bytes_written
        start = time.perf_counter()
        loss = compiled(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss_value = loss.item()  # waits for the device
        step_seconds.append(time.perf_counter() - start)
        step_bytes.append(fxoffload.stats().bytes_written - before)
        if rank == 0:
            note = " (includes compiling)" if step == 1 else ""
            print(
                f"step {step:3d}  loss {loss_value:.4f}  {step_seconds[-1]:6.2f} s  "
                f"rank 0 offloaded {step_bytes[-1] / MIB:.1f} MiB{note}",
                flush=True,
            )

    stats = fxoffload.stats()
    mine = {
        "rank": rank,
        "directory": ", ".join(
            os.path.basename(d.directory) for e in fxoffload.runtime.engines() for d in e.drives
        ),
        "bytes_per_step": step_bytes[1:] or step_bytes,
        "median_s": statistics.median(step_seconds[1:] or step_seconds),
        "tensors_stored": stats.tensors_stored,
        "bytes_read": stats.bytes_read,
        "tensors_forwarded": stats.tensors_forwarded,
    }
    everyone: list[dict | None] = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        print(f"per rank, steps 2-{args.steps} (step 1 compiles):")
        for r in everyone:
            assert r is not None
            per_step = sorted({round(b / MIB, 2) for b in r["bytes_per_step"]})
            shown = " to ".join(f"{b:.2f}" for b in (per_step[0], per_step[-1]))
            if len(per_step) == 1:
                shown = f"{per_step[0]:.2f}"
            print(
                f"  rank {r['rank']}: offloaded {shown} MiB per step, "
                f"median step {r['median_s'] * 1000:.0f} ms; in all {r['tensors_stored']} "
                f"tensors stored, {r['bytes_read'] / MIB:.1f} MiB read back, "
                f"{r['tensors_forwarded']} forwarded from memory; "
                f"directory {r['directory'] or '(none: nothing offloaded)'}"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
