"""Measure the rates the planner's cost model needs, once, and remember them.

The disk is measured through the engine's own offload file (its I/O mode)
and thread count: sequential chunks written and read back by
``io_threads`` threads, each checksummed as the engine does when it
verifies; the CPU time those threads take per byte is measured with them.
Compute is measured on the device the graph runs on: a matmul for the FLOP
rate, a copy for memory bandwidth and one to host memory for the staging
copy, at the current thread count. Both are cached in
``<offload_dir>/fxoffload-costs.json``, so later processes plan with the same
numbers, which also keeps compiled-graph cache keys stable across runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

from fxoffload.runtime.checksum import checksum
from fxoffload.runtime.engine import Engine
from fxoffload.runtime.offload_file import OffloadFile, aligned_buffer, as_memoryview

log = logging.getLogger(__name__)

CACHE_NAME = "fxoffload-costs.json"
DISK_PROBE_BYTES = 64 << 20


UNMEASURED_BYTES_PER_S = 1.0
"""The rate assumed for a disk that could not be measured: too slow to hide anything."""


def disk_rates(engine: Engine) -> tuple[float, float, float]:
    """(write, read) bytes per second of ``engine``'s offload file, and the CPU seconds its
    I/O threads spend per byte moved; cached per directory.

    A disk that cannot be measured (no room for the probe, an I/O error) gets
    ``UNMEASURED_BYTES_PER_S``, with a warning, and is not cached: the
    planner then offloads nothing under ``"adaptive"``.
    """
    mode = "direct" if engine.file.direct else "buffered"
    verify = "verify" if engine.config.verify else "raw"
    key = f"disk:{mode}:{engine.config.io_threads}:{verify}"
    cached = _cached(engine.root, key, 3)
    if cached is None:
        try:
            cached = _measure_disk(engine)
        except OSError as e:
            warnings.warn(
                f"fxoffload could not measure the disk of {engine.root!r} ({e}); "
                "planning as if it were too slow to offload anything. Give "
                "write_bytes_per_s and read_bytes_per_s to plan without measuring.",
                RuntimeWarning,
                stacklevel=2,
            )
            return UNMEASURED_BYTES_PER_S, UNMEASURED_BYTES_PER_S, 0.0
        _remember(engine.root, key, cached)
    return cached[0], cached[1], cached[2]


def compute_rates(root: str, device: torch.device) -> tuple[float, float, float, float]:
    """(FLOP/s, 16-bit FLOP/s, memory bytes/s, bytes/s copied to host memory) of ``device``,
    cached under ``root``. The last is what ``store``'s copy into staging runs at.

    Matmuls in bfloat16 or float16 (autocast) can run many times faster than
    in float32 (about 15x on an H100 at full float32 precision, by its
    datasheet; 1.25x measured on an H200 whose float32 matmuls ran at TF32
    speed), and a plan made with the float32 rate alone thinks a bf16 forward
    pass that much longer than it is. The float32 rate depends on
    ``torch.get_float32_matmul_precision()``, so that is part of the cache key;
    on the CPU, so is the thread count.
    """
    precision = torch.get_float32_matmul_precision()
    if device.type == "cuda":
        key = f"compute:{torch.cuda.get_device_name(device)}:{precision}"
    else:
        key = f"compute:{device.type}:{torch.get_num_threads()}:{precision}"
    cached = _cached(root, key, 4)
    if cached is None:
        cached = _measure_compute(device)
        _remember(root, key, cached)
    return cached[0], cached[1], cached[2], cached[3]


def _measure_disk(engine: Engine) -> tuple[float, float]:
    """Write then read a probe file next to the engine's, in its I/O mode, chunks and threads."""
    chunk = engine.config.chunk_bytes
    nbytes = max(DISK_PROBE_BYTES // chunk, 1) * chunk
    buf = aligned_buffer(nbytes)
    buf.random_()  # real bytes, in pages that exist before the clock starts
    view = as_memoryview(buf)
    file = OffloadFile(engine.directory, direct=engine.file.direct, name="probe.bin")
    offsets = range(0, nbytes, chunk)
    verify = engine.config.verify

    def write(piece: memoryview, offset: int) -> None:
        if verify:  # as the engine's threads do, so their CPU time is measured too
            checksum(piece)
        file.write(piece, offset)

    def read(piece: memoryview, offset: int) -> None:
        file.read(piece, offset)
        if verify:
            checksum(piece)

    try:
        slot = file.allocate(nbytes)
        with ThreadPoolExecutor(engine.config.io_threads) as pool:
            cpu = time.process_time()  # this thread only waits: the rest is the I/O threads'
            begin = time.perf_counter()
            list(pool.map(lambda o: write(view[o : o + chunk], slot.offset + o), offsets))
            file.sync()
            wrote = time.perf_counter() - begin
            begin = time.perf_counter()
            list(pool.map(lambda o: read(view[o : o + chunk], slot.offset + o), offsets))
            read = time.perf_counter() - begin
            cpu = time.process_time() - cpu
    finally:
        file.close()
    rates = (nbytes / wrote, nbytes / read, cpu / (2 * nbytes))
    log.info(
        "disk of %s: write %.2f GB/s, read %.2f GB/s, I/O CPU %.2f ms/GB",
        engine.root,
        rates[0] / 1e9,
        rates[1] / 1e9,
        rates[2] * 1e12,
    )
    return rates


def _measure_compute(device: torch.device) -> tuple[float, float, float]:
    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device)
    half = a.to(torch.bfloat16)
    src = torch.empty(16 << 20, device=device)  # 64 MiB of float32
    dst = torch.empty_like(src)
    host = torch.empty_like(src, device="cpu", pin_memory=device.type == "cuda")
    flops = 2 * n**3 / _best_time(lambda: torch.mm(a, a), device)
    flops_16bit = 2 * n**3 / _best_time(lambda: torch.mm(half, half), device)
    memory = 2 * src.nbytes / _best_time(lambda: dst.copy_(src), device)
    to_host = src.nbytes / _best_time(lambda: host.copy_(src), device)
    log.info(
        "%s: %.1f GFLOP/s (16-bit: %.1f), memory %.1f GB/s, to host %.1f GB/s",
        device,
        flops / 1e9,
        flops_16bit / 1e9,
        memory / 1e9,
        to_host / 1e9,
    )
    return flops, flops_16bit, memory, to_host


def _best_time(fn, device: torch.device, reps: int = 5) -> float:
    """The fastest of ``reps`` timed calls, after one warm-up call."""
    best = float("inf")
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - begin)
    return best


def _cached(root: str, key: str, count: int = 2) -> tuple[float, ...] | None:
    try:
        with open(os.path.join(root, CACHE_NAME)) as f:
            value = json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    if (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(v, (int, float)) and v > 0 for v in value)
    ):
        return tuple(float(v) for v in value)
    return None


def _remember(root: str, key: str, rates: tuple[float, ...]) -> None:
    """Add ``key`` to the cache file; atomic, so concurrent processes never see half a file."""
    path = os.path.join(root, CACHE_NAME)
    try:
        with open(path) as f:
            table = json.load(f)
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    table[key] = list(rates)
    with contextlib.suppress(OSError):
        fd, tmp = tempfile.mkstemp(prefix=".fxoffload-costs-", dir=root)
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1)
        os.replace(tmp, path)
