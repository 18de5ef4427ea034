"""Offloading under torch.distributed: DDP and FSDP2, two ranks on gloo (CPU, loopback).

Each rank is a separate process running this file as a script, as
torchrun would start it. A rank trains the same small model a few SGD steps
twice, compiled with ``policy="none"`` and with ``policy="all"``, on inputs
seeded by its rank (so DDP's allreduce and FSDP2's reduce-scatter really mix
the ranks' gradients), and saves what it saw to a file the test reads:

- every loss, gradient (for FSDP2 the rank's local shard) and final
  parameter of ``"all"`` must be bitwise that of ``"none"``: the collectives
  run on gradients that offloading must not have changed by a bit;
- each rank really offloaded (its own ``fxoffload.stats()``);
- DDP really split the model into several compiled graphs (Dynamo's
  DDPOptimizer cuts at gradient-bucket boundaries), each compiled by this
  backend, so offloaded activations and bucket allreduces interleave in
  backward;
- each rank wrote under its own ``fxoffload-rank<R>-<pid>-XXXX`` directory of
  the shared ``offload_dir``, and both are gone once the engines close.

The ranks join with ``init_process_group(init_method="tcp://...", rank=...)``
and no ``RANK`` variable, so the directory name must come from the
initialized process group (the ``RANK`` variable that torchrun sets is
covered by ``test_private_dir.py`` and the torchrun example).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from training_runs import Run, assert_runs_equal, reproducible

import fxoffload
from fxoffload.runtime import close_all, engines

WORLD_SIZE = 2
STEPS = 3
WIDTH = 512
"""A 512x512 float32 Linear weight is 1 MiB: one DDP bucket per block at ``bucket_cap_mb=1``
(DDPOptimizer wants buckets no smaller than DDP's 1 MiB first bucket)."""
BLOCKS = 4

# Disabling inductor's caches (see ``reproducible``) also disables dynamo's
# profile-guided shapes, which torch announces on every compile.
pytestmark = pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled:UserWarning")


# -- what a rank runs -------------------------------------------------------------------


class Block(nn.Module):
    """Linear + GELU: the Linear output (64 KiB at batch 32) is saved for GELU's backward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc(x))


class Net(nn.Module):
    """Blocks and a head. A module of our own, not ``nn.Sequential``: Dynamo does not
    trace ``torch.nn`` container frames reached from DDP's (eager) forward, so a
    compiled ``DDP(nn.Sequential(...))`` would run uncompiled."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x).square().mean()


def parallelize(parallelism: str, model: Net, options: dict[str, Any]) -> nn.Module:
    """The compiled step for ``model``, the usual way for each kind of parallelism.

    DDP: ``torch.compile(DDP(model))``, so that Dynamo's DDPOptimizer splits
    the graph at bucket boundaries (1 MiB buckets: one per block) and each
    piece goes to the backend. FSDP2: ``fully_shard`` per block and on the
    root, then each block compiled in place, as torchtitan does (FSDP2's hooks
    run outside the compiled blocks).
    """
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return torch.compile(DDP(model, bucket_cap_mb=1), backend="ssdtrain", options=options)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    for block in model.blocks:
        block.compile(backend="ssdtrain", options=options)
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of an FSDP2 DTensor, else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def train(parallelism: str, compiler: str, policy: str, offload_dir: str) -> dict[str, Any]:
    """Train a fresh ``Net`` (same initial weights on every rank) ``STEPS`` SGD steps."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net()
    options = {"compiler": compiler, "min_bytes": 0, "offload_dir": offload_dir, "policy": policy}
    step = parallelize(parallelism, model, options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = torch.Generator().manual_seed(1000 + dist.get_rank())
    batches = [torch.randn(32, WIDTH, generator=inputs) for _ in range(STEPS)]
    graphs_before = torch._dynamo.utils.counters["aot_autograd"]["total"]
    fxoffload.reset_stats()
    run = Run()
    for x in batches:
        loss = step(x)
        loss.backward()
        run.losses.append(loss.detach())
        run.grads.append({n: local(p.grad).clone() for n, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
    run.final_state = {n: local(p.detach()).clone() for n, p in model.named_parameters()}
    return {
        "run": dataclasses.asdict(run) | {"stats": dataclasses.asdict(fxoffload.stats())},
        "graphs": torch._dynamo.utils.counters["aot_autograd"]["total"] - graphs_before,
    }


def rank_main(rank: int, port: int, offload_dir: str, out_dir: str, cases: list[str]) -> None:
    """One rank: every case with both policies, then the private directories' checks."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=120),
    )
    results: dict[str, Any] = {"pid": os.getpid()}
    for case in cases:
        parallelism, compiler = case.split("-")
        with reproducible(compiler):
            results[case] = {
                policy: train(parallelism, compiler, policy, offload_dir)
                for policy in ("none", "all")
            }
    # Both ranks' engines are alive here: each sees the other's directory too.
    (engine,) = engines()
    results["own_dir"] = os.path.basename(engine.drives[0].directory)
    dist.barrier()
    results["dirs_while_running"] = sorted(os.listdir(offload_dir))
    dist.barrier()
    close_all()
    results["own_dir_exists_after_close"] = os.path.exists(engine.drives[0].directory)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


# -- the test side ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, cases: list[str]) -> tuple[Path, list[dict[str, Any]]]:
    """Run ``cases`` on ``WORLD_SIZE`` rank processes; return the offload dir and each
    rank's results. A rank that fails stops the others (they would wait in a collective)."""
    offload_dir, out_dir = tmp_path / "offload", tmp_path / "results"
    offload_dir.mkdir()
    out_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_LOGS", "RANK", "WORLD_SIZE")}
    if os.path.isdir("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    port = free_port()
    logs = [tmp_path / f"rank{r}.log" for r in range(WORLD_SIZE)]
    procs = []
    for r, log in enumerate(logs):
        with open(log, "w") as out:
            argv = [str(r), str(port), str(offload_dir), str(out_dir), *cases]
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, *argv], stdout=out, stderr=subprocess.STDOUT, env=env
                )
            )
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    outputs = [log.read_text() for log in logs]
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    assert not failed, f"ranks failed (rank, returncode): {failed}\n" + "\n".join(
        f"--- rank {r} ---\n{out[-6000:]}" for r, out in enumerate(outputs)
    )
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return offload_dir, results


def as_run(saved: dict[str, Any]) -> Run:
    return Run(**{**saved, "stats": fxoffload.OffloadStats(**saved["stats"])})


def check_offloading_is_bitwise_invisible(results: list[dict[str, Any]], case: str) -> None:
    """On every rank: "all" offloaded, "none" did not, and the two runs are bitwise equal."""
    for rank, r in enumerate(results):
        none, offloaded = as_run(r[case]["none"]["run"]), as_run(r[case]["all"]["run"])
        assert none.stats.tensors_stored == 0 and none.stats.bytes_written == 0, rank
        assert offloaded.stats.tensors_stored > 0 and offloaded.stats.bytes_written > 0, rank
        assert offloaded.stats.bytes_read > 0 or offloaded.stats.tensors_forwarded > 0, rank
        assert offloaded.stats.io_errors == 0 and offloaded.stats.handles_live == 0, rank
        assert_runs_equal(none, offloaded)


@pytest.fixture(scope="module")
def aot_eager_ranks(tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    """DDP and FSDP2 with aot_eager, in one launch: starting ranks costs seconds."""
    return launch(tmp_path_factory.mktemp("aot_eager"), ["ddp-aot_eager", "fsdp2-aot_eager"])


def test_ddp_offloading_is_bitwise_invisible(aot_eager_ranks) -> None:
    _, results = aot_eager_ranks
    check_offloading_is_bitwise_invisible(results, "ddp-aot_eager")
    for r in results:
        # DDPOptimizer split the model: one graph per bucket, each through the backend.
        assert r["ddp-aot_eager"]["all"]["graphs"] > 1
    # The ranks saw different data, yet hold the same (allreduced) gradients.
    r0, r1 = (as_run(r["ddp-aot_eager"]["all"]["run"]) for r in results)
    assert not torch.equal(r0.losses[0], r1.losses[0])
    for g0, g1 in zip(r0.grads, r1.grads, strict=True):
        assert all(torch.equal(g0[n], g1[n]) for n in g0)


def test_fsdp2_offloading_is_bitwise_invisible(aot_eager_ranks) -> None:
    _, results = aot_eager_ranks
    check_offloading_is_bitwise_invisible(results, "fsdp2-aot_eager")
    for r in results:
        assert r["fsdp2-aot_eager"]["all"]["graphs"] >= 1
        # The gradients compared are the rank's shards: half the rows of each weight.
        grads = r["fsdp2-aot_eager"]["all"]["run"]["grads"][0]
        assert grads["blocks.0.fc.weight"].shape == (WIDTH // WORLD_SIZE, WIDTH)


def test_each_rank_has_its_own_private_dir(aot_eager_ranks) -> None:
    offload_dir, results = aot_eager_ranks
    names = [r["own_dir"] for r in results]
    for rank, r in enumerate(results):
        assert re.fullmatch(rf"fxoffload-rank{rank}-{r['pid']}-\w+", r["own_dir"]), r["own_dir"]
        # While both ran, the shared offload_dir held both ranks' directories.
        assert set(names) <= set(r["dirs_while_running"])
        assert not r["own_dir_exists_after_close"]
    assert not [p.name for p in offload_dir.iterdir() if p.is_dir()]


@pytest.mark.skipif(
    os.environ.get("FXOFFLOAD_DISTRIBUTED_INDUCTOR") != "1",
    reason="100 s or more on 2 cores; FXOFFLOAD_DISTRIBUTED_INDUCTOR=1 runs it",
)
def test_ddp_inductor_offloading_is_bitwise_invisible(tmp_path) -> None:
    """Inductor's kernels too, with caches off and one thread (``reproducible``).

    Opt-in: each rank compiles 5 graphs twice with caches off, and inductor's
    first CPU compile in a process spends seconds probing the compiler's
    vector ISAs; with two ranks on two cores that is 100 s or more.
    """
    _, results = launch(tmp_path, ["ddp-inductor"])
    check_offloading_is_bitwise_invisible(results, "ddp-inductor")
    assert all(r["ddp-inductor"]["all"]["graphs"] > 1 for r in results)


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:])
