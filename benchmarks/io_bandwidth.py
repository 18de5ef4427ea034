"""How close the engine runs to the disk's own bandwidth, and what offloading costs a step.

In one run, against the offload directory's device:

1. raw: one large sequential O_DIRECT write, then read, of ``--total-mib``;
2. engine: ``store`` of tensors of 1, 4, 16 and 64 MiB moving the same total
   (copy into staging included, timed until every write landed), then
   ``prefetch`` + ``wait`` of all of them; each as GB/s and as a ratio to raw.
   A cloud disk's speed drifts (on the development machine by 2x within a
   minute), so each engine measurement is paired with a raw one taken just
   before it, ``--repeats`` times per size, and the table gives the median
   and range of those paired ratios. Each size is measured twice: by a new
   engine, whose staging buffers are all fresh pages (faulting them in is
   part of what ``store`` costs on the calling thread), and "pooled", by an
   engine after one unmeasured pass, as a training loop runs from its second
   step, with ``staging_pool_bytes`` raised to the total so that every
   buffer is kept;
3. a training step of a model with large, cheap activations under
   ``policy="all"`` vs ``policy="none"`` (same compile otherwise), both in this
   process with their steps alternated: the median and range of the paired
   step time ratios, and the effective bandwidth, bytes offloaded per step
   divided by the extra median time per step.

4. one directory against several (``--dirs``, one per drive; by default two
   directories in ``--dir``, on one disk): store and load of 64 MiB tensors
   by an engine on the first directory alone and by one on all of them,
   alternated ``--repeats`` times, with the ratio of each pair.

``--sweep`` adds a table over I/O threads and chunk sizes, from which the
defaults were chosen. Run from the repository root::

    python benchmarks/io_bandwidth.py [--dir /nvme/x] [--total-mib 1024] [--sweep] \\
        [--device cuda] [--no-step] [--repeats 3] [--dirs /nvme0/x,/nvme1/x]

``--device cuda`` stores tensors that live on the GPU: the engine's numbers
then include the copies through pinned memory, and GPU Direct Storage
(``torch.cuda.gds``) is measured too, where it works. The training step always runs
on the CPU; ``--no-step`` skips it.
"""

from __future__ import annotations

import argparse
import dataclasses
import mmap
import os
import statistics
import tempfile
import time

import torch

import fxoffload
from fxoffload.runtime import Engine, EngineConfig

MiB = 1 << 20


def raw_bandwidth(directory: str, total: int) -> tuple[float, float, bool]:
    """Sequential write then read of ``total`` bytes in 16 MiB calls; GB/s each, and direct?"""
    block = 16 * MiB
    buf = mmap.mmap(-1, block)
    buf.write(os.urandom(MiB) * 16)
    path = os.path.join(directory, "raw.bin")
    direct = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    except OSError:
        direct = False
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, total)
        start = time.perf_counter()
        for offset in range(0, total, block):
            os.pwrite(fd, buf, offset)
        os.fsync(fd)
        write = total / (time.perf_counter() - start) / 1e9
        start = time.perf_counter()
        for offset in range(0, total, block):
            os.preadv(fd, [buf], offset)
        read = total / (time.perf_counter() - start) / 1e9
    finally:
        os.close(fd)
        os.unlink(path)
    return write, read, direct


def engine_bandwidth(
    directory: str | list[str],
    size: int,
    total: int,
    config: EngineConfig,
    device: torch.device,
    pooled: bool = False,
):
    """Store then load ``total`` bytes as tensors of ``size`` bytes on ``device``; GB/s each.

    ``directory`` may be several, one per drive, as ``offload_dir``.

    A new engine has no buffers yet: every store copies into fresh pages, which
    fault in as it writes them. ``pooled`` measures the engine as a training
    loop sees it from its second step: one unmeasured store and load of the
    same tensors first, with a staging pool that keeps all their buffers.
    """
    if pooled:
        config = dataclasses.replace(
            config, staging_pool_bytes=max(config.staging_pool_bytes, total)
        )
    engine = Engine(directory, config)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    tensors = [torch.randn(size // 4, device=device) for _ in range(max(1, total // size))]
    moved = len(tensors) * size
    try:
        for _ in range(2 if pooled else 1):  # the last pass is the one measured
            sync()
            before = fxoffload.runtime.snapshot()
            start = time.perf_counter()
            handles = [engine.store(t) for t in tensors]
            while engine.inflight_bytes:
                time.sleep(0.0005)
            store = moved / (time.perf_counter() - start) / 1e9
            start = time.perf_counter()
            for h in handles:
                engine.prefetch(h)
            for h in handles:
                engine.wait(h)  # dropped at once: its read buffer goes back to the pool
            sync()  # on CUDA, wait's copy to the device is queued on the stream
            load = moved / (time.perf_counter() - start) / 1e9
            del handles
            after = fxoffload.runtime.snapshot()
            assert after.tensors_forwarded == before.tensors_forwarded, "a load was not a read"
            waits = after.store_waits - before.store_waits
    finally:
        engine.close()
    return store, load, waits


def drives_bandwidth(
    dirs: list[str], total: int, config: EngineConfig, device: torch.device, repeats: int
) -> None:
    """Print store and load GB/s of an engine on ``dirs[0]`` and of one on all ``dirs``,
    alternated ``repeats`` times (64 MiB tensors, pooled), and their paired ratios."""
    runs: dict[int, list[tuple[float, float]]] = {1: [], len(dirs): []}
    for _ in range(repeats):
        for n in runs:
            store, load, _ = engine_bandwidth(dirs[:n], 64 * MiB, total, config, device, True)
            runs[n].append((store, load))
    print(f"one directory against {len(dirs)} ({', '.join(dirs)}), 64 MiB tensors, pooled:")
    for n, measured in runs.items():
        stores, loads = zip(*measured, strict=True)
        print(f"  {n} dir{'s' if n > 1 else ''}: store {spread(stores)} GB/s, load {spread(loads)}")
    pairs = zip(runs[1], runs[len(dirs)], strict=True)
    ratios = [(many[0] / one[0], many[1] / one[1]) for one, many in pairs]
    print(
        f"  {len(dirs)} dirs / 1: store {spread([r[0] for r in ratios])}, "
        f"load {spread([r[1] for r in ratios])}"
    )


def pcie_bandwidth(total: int) -> tuple[float, float]:
    """GPU to pinned host memory and back, ``total`` bytes each way; GB/s each."""
    device = torch.empty(total, dtype=torch.uint8, device="cuda")
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    rates = []
    for dst, src in ((host, device), (device, host)):
        dst.copy_(src, non_blocking=True)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        rates.append(total / (time.perf_counter() - start) / 1e9)
    return rates[0], rates[1]


def gds_bandwidth(directory: str, total: int) -> tuple[float, float] | str:
    """GPU Direct Storage (``torch.cuda.gds``, cuFile): write then read ``total`` bytes
    straight from and into GPU memory in 64 MiB calls; GB/s each, or why it cannot run.

    Measured to decide whether an engine path through cuFile would earn its place
    next to the pinned-memory path: it has to beat ``--device cuda``'s store and load.
    """
    block = 64 * MiB
    path = os.path.join(directory, "gds.bin")
    try:
        from torch.cuda import gds

        storage = torch.randn(block // 4, device="cuda").untyped_storage()
        gds.gds_register_buffer(storage)
        file = gds.GdsFile(path, os.O_CREAT | os.O_RDWR | os.O_DIRECT)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for offset in range(0, total, block):
            file.save_storage(storage, offset)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        write = total / (time.perf_counter() - start) / 1e9
        start = time.perf_counter()
        for offset in range(0, total, block):
            file.load_storage(storage, offset)
        torch.cuda.synchronize()
        read = total / (time.perf_counter() - start) / 1e9
        del file
        gds.gds_deregister_buffer(storage)
    except (RuntimeError, OSError, ImportError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return write, read


class CheapActivations(torch.nn.Module):
    """Wide elementwise layers: many activation bytes per FLOP, the hard case to hide."""

    def __init__(self, width: int = 1024, layers: int = 6) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x)) * torch.sigmoid(x)
        return x.square().mean()


def paired_step_times(
    directory: str, compiler: str, steps: int, verify: bool
) -> tuple[list[float], list[float], int]:
    """Step times (s) under ``"none"`` and ``"all"``, their steps alternated; bytes per step.

    Both are compiled in this process and each ``"all"`` step runs right after a
    ``"none"`` one, so that a machine whose speed drifts affects the two alike.
    """
    torch._dynamo.reset()
    x = torch.randn(2048, 1024)
    compiled = {}
    for policy in ("none", "all"):
        torch.manual_seed(0)
        options = {
            "policy": policy,
            "offload_dir": directory,
            "compiler": compiler,
            "verify": verify,
        }
        compiled[policy] = torch.compile(CheapActivations(), backend="ssdtrain", options=options)
        for _ in range(2):  # compile and warm up
            compiled[policy](x).backward()
    times: dict[str, list[float]] = {policy: [] for policy in compiled}
    before = fxoffload.stats().bytes_written
    for _ in range(steps):
        for policy, step in compiled.items():
            start = time.perf_counter()
            step(x).backward()
            times[policy].append(time.perf_counter() - start)
    return times["none"], times["all"], (fxoffload.stats().bytes_written - before) // steps


def spread(values) -> str:
    """``median [min-max]`` of a few measurements."""
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="offload directory")
    parser.add_argument("--total-mib", type=int, default=1024, help="bytes moved per measurement")
    parser.add_argument("--io-threads", type=int, default=fxoffload.config.io_threads)
    parser.add_argument("--chunk-mib", type=int, default=fxoffload.config.chunk_bytes // MiB)
    parser.add_argument(
        "--staging-pool-mib",
        type=int,
        default=fxoffload.config.staging_pool_bytes // MiB,
        help="the staging_pool_bytes option",
    )
    parser.add_argument("--compiler", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each policy")
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=fxoffload.config.verify,
        help="checksum chunks (the verify option)",
    )
    parser.add_argument("--sweep", action="store_true", help="also sweep threads x chunk size")
    parser.add_argument(
        "--device", default="cpu", help="where the stored tensors live (cuda: via pinned memory)"
    )
    parser.add_argument("--no-step", action="store_true", help="skip the training-step part")
    parser.add_argument(
        "--repeats", type=int, default=3, help="paired raw/engine measurements per tensor size"
    )
    parser.add_argument(
        "--dirs",
        help="comma-separated offload directories, one per drive, measured against the first "
        "alone (default: two directories in --dir)",
    )
    args = parser.parse_args()
    total = args.total_mib * MiB
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        print(f"fxoffload I/O benchmark: dir={args.dir} torch={torch.__version__}")
        config = EngineConfig(
            io_threads=args.io_threads,
            chunk_bytes=args.chunk_mib * MiB,
            verify=args.verify,
            staging_pool_bytes=args.staging_pool_mib * MiB,
        )
        print(
            f"engine (io_threads={config.io_threads}, chunk={args.chunk_mib} MiB, "
            f"staging pool {args.staging_pool_mib} MiB, "
            f"verify={config.verify}, tensors on {device}), {args.total_mib} MiB per "
            f"measurement, ratio to the raw run just before it, median [range] of {args.repeats}:"
        )
        print(
            "  new: a fresh engine, whose staging buffers are new pages; pooled: after one\n"
            "  unmeasured pass, buffers reused from a pool that holds them all (a training\n"
            "  loop's later steps, when staging_pool_bytes covers what a step offloads)"
        )
        print(
            f"{'tensor':>8} {'engine':>7} {'store GB/s':>11} {'/raw':>17} {'load GB/s':>10} "
            f"{'/raw':>17}"
        )
        raws = []
        for size_mib in (1, 4, 16, 64):
            runs: dict[bool, list[tuple[float, float, float, float, int]]] = {False: [], True: []}
            for _ in range(args.repeats):
                for pooled in (False, True):
                    raw_w, raw_r, direct = raw_bandwidth(work, total)
                    raws.append((raw_w, raw_r))
                    store, load, waits = engine_bandwidth(
                        work, size_mib * MiB, total, config, device, pooled
                    )
                    runs[pooled].append((store, store / raw_w, load, load / raw_r, waits))
            for pooled, measured in runs.items():
                stores, store_ratios, loads, load_ratios, waits = zip(*measured, strict=True)
                note = f"  ({sum(waits)} store waits)" if sum(waits) else ""
                print(
                    f"{size_mib:>5} MiB {'pooled' if pooled else 'new':>7} "
                    f"{statistics.median(stores):>11.2f} {spread(store_ratios):>17} "
                    f"{statistics.median(loads):>10.2f} {spread(load_ratios):>17}{note}"
                )
        raw_w = statistics.median([w for w, _ in raws])
        raw_r = statistics.median([r for _, r in raws])
        print(
            f"raw sequential ({'O_DIRECT' if direct else 'buffered'}): write "
            f"{spread([w for w, _ in raws])} GB/s, read {spread([r for _, r in raws])} GB/s"
        )

        if device.type == "cuda":
            d2h, h2d = pcie_bandwidth(total)
            print(f"GPU <-> pinned memory: to host {d2h:.1f} GB/s, to GPU {h2d:.1f} GB/s")
            gds = gds_bandwidth(work, total)
            if isinstance(gds, str):
                print(f"GPU Direct Storage (torch.cuda.gds): not usable here: {gds}")
            else:
                print(
                    f"GPU Direct Storage (torch.cuda.gds, {args.total_mib} MiB from GPU memory):"
                    f" write {gds[0]:.2f} GB/s ({gds[0] / raw_w:.2f} of raw), read"
                    f" {gds[1]:.2f} GB/s ({gds[1] / raw_r:.2f} of raw)"
                )

        if args.sweep:
            print("sweep: store/load GB/s for 16 and 64 MiB tensors")
            for threads in (1, 2, 4, 8):
                for chunk_mib in (1, 4, 8, 16):
                    cfg = EngineConfig(
                        io_threads=threads, chunk_bytes=chunk_mib * MiB, verify=args.verify
                    )
                    cells = []
                    for size_mib in (16, 64):
                        s, ld, _ = engine_bandwidth(work, size_mib * MiB, total, cfg, device)
                        cells.append(f"{size_mib} MiB {s:.2f}/{ld:.2f}")
                    print(f"  threads={threads} chunk={chunk_mib:>2} MiB: " + "  ".join(cells))

        dirs = args.dirs.split(",") if args.dirs else []
        if not dirs:
            dirs = [os.path.join(work, name) for name in ("drive0", "drive1")]
            for d in dirs:
                os.mkdir(d)
        drives_bandwidth(dirs, total, config, device, args.repeats)

        if args.no_step:
            return
        nones, alls, per_step = paired_step_times(work, args.compiler, args.steps, args.verify)
        none, offloaded = statistics.median(nones), statistics.median(alls)
        extra = offloaded - none
        effective = per_step / extra / 1e9 if extra > 0 else float("inf")
        paired = [a / n for a, n in zip(alls, nones, strict=True)]
        print(
            f"training step ({args.compiler}, {per_step / MiB:.0f} MiB offloaded per step, "
            f"{args.steps} alternated steps each): none {none * 1e3:.0f} ms, all "
            f"{offloaded * 1e3:.0f} ms (medians), paired ratio {spread(paired)}, "
            f"effective bandwidth {effective:.2f} GB/s"
        )


if __name__ == "__main__":
    main()
