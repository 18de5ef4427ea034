"""Measure the rates the planner's cost model needs, once, and remember them.

A disk is measured through a probe file beside a drive's offload file (in
the engine's I/O mode, chunk size and thread count): sequential chunks written and read back by
``io_threads`` threads, each checksummed as the engine does when it
verifies; then what that I/O costs compute on the CPU, as the slowdown of a
matmul loop beside it.
Compute is measured on the device the graph runs on: a matmul for the FLOP
rate, a copy for memory bandwidth and one to host memory for the staging
copy, at the current thread count. Both are cached in a per-user file
(``cache_path()``; the disk's rates keyed by the file system measured), so
later processes plan with the same numbers, which also keeps compiled-graph
cache keys stable across runs.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from fxoffload.runtime.checksum import checksum
from fxoffload.runtime.drives import Drive
from fxoffload.runtime.engine_config import EngineConfig
from fxoffload.runtime.offload_file import OffloadFile, aligned_buffer, as_memoryview

log = logging.getLogger(__name__)

CACHE_NAME = "costs.json"


def cache_path() -> str:
    """The file of measured rates: in ``$FXOFFLOAD_CACHE_DIR``, else in
    ``<temporary directory>/fxoffload_<user>``, as inductor keeps its cache."""
    directory = os.environ.get("FXOFFLOAD_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"fxoffload_{getpass.getuser()}"
    )
    return os.path.join(directory, CACHE_NAME)


DISK_PROBE_BYTES = 64 << 20
"""Bytes the disk probe moves, or a quarter of the free space if that is less."""


UNMEASURED_BYTES_PER_S = 1.0
"""The rate assumed for a disk that could not be measured: too slow to hide anything."""


def file_system(path: str) -> str:
    """Names the file system that holds ``path`` in disk cache keys: its device number and its
    file system id (``statvfs``'s ``f_fsid``), so that a device number the kernel gives to a
    later mount (a new tmpfs) does not find the rates of the earlier one."""
    return f"{os.stat(path).st_dev}.{os.statvfs(path).f_fsid}"


def disk_rates(drives: Sequence[Drive], config: EngineConfig) -> tuple[float, float, float]:
    """(write, read) bytes per second of an engine's ``drives`` together, and the compute seconds
    their I/O takes from a CPU device per byte moved.

    Drives on one file system share its bandwidth, so each file system counts
    once: the rates are the sums of those of the file systems the drives are
    on, and the compute per byte their mean, weighted by write rate.
    """
    one_per_fs = {file_system(d.root): d for d in drives}
    rates = [drive_rates(d, config) for d in one_per_fs.values()]
    write = sum(r[0] for r in rates)
    read = sum(r[1] for r in rates)
    return write, read, sum(r[0] * r[2] for r in rates) / write


def drive_weights(drives: Sequence[Drive], config: EngineConfig) -> list[float]:
    """How to split tensors over ``drives``: equally on one file system, else by the write
    rate of each drive's file system, shared equally by the drives on it."""
    devices = [file_system(d.root) for d in drives]
    if len(set(devices)) == 1:
        return [1.0] * len(drives)
    return [
        drive_rates(d, config)[0] / devices.count(dev)
        for d, dev in zip(drives, devices, strict=True)
    ]


def drive_rates(drive: Drive, config: EngineConfig) -> tuple[float, float, float]:
    """(write, read) bytes per second of ``drive``'s offload file, and the compute seconds its
    I/O takes from a CPU device per byte moved; cached per file system and I/O settings.

    A disk that cannot be measured (no room for the probe, an I/O error) gets
    ``UNMEASURED_BYTES_PER_S``, with a warning, and is not cached: the
    planner then offloads nothing under ``"adaptive"``, and a drive beside
    others gets next to no bytes.
    """
    mode = "direct" if drive.file.direct else "buffered"
    verify = "verify" if config.verify else "raw"
    key = (
        f"disk:{file_system(drive.root)}:{mode}:{config.io_threads}"
        f":{config.chunk_bytes}:{verify}:{torch.get_num_threads()}"
    )
    cached = _cached(key, 3)
    if cached is None:
        try:
            cached = _measure_disk(drive, config)
        except OSError as e:
            warnings.warn(
                f"fxoffload could not measure the disk of {drive.root!r} ({e}); "
                "planning as if it were too slow to offload anything. Give "
                "write_bytes_per_s and read_bytes_per_s to plan without measuring.",
                RuntimeWarning,
                stacklevel=3,  # where the engine was made or the plan asked for rates
            )
            return UNMEASURED_BYTES_PER_S, UNMEASURED_BYTES_PER_S, 0.0
        _remember(key, cached)
    return cached[0], cached[1], cached[2]


def compute_rates(device: torch.device) -> tuple[float, float, float, float]:
    """(FLOP/s, 16-bit FLOP/s, memory bytes/s, bytes/s copied to host memory) of ``device``,
    cached. The last is what ``store``'s copy into staging runs at.

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
    cached = _cached(key, 4)
    if cached is None:
        cached = _measure_compute(device)
        _remember(key, cached)
    return cached[0], cached[1], cached[2], cached[3]


class _ProbeIO:
    """A probe file next to a drive's, moved in the engine's I/O mode, chunk size and thread
    count, each chunk checksummed as the engine does when it verifies."""

    def __init__(self, config: EngineConfig, file: OffloadFile, nbytes: int) -> None:
        self.chunk = config.chunk_bytes
        self.threads = config.io_threads
        self.verify = config.verify
        self.file = file
        self.slot = file.allocate(nbytes)
        self.buf = aligned_buffer(nbytes)  # the view does not keep it alive
        self.buf.random_()  # real bytes, in pages that exist before the clock starts
        self.view = as_memoryview(self.buf)
        self.offsets = range(0, nbytes, self.chunk)

    def write(self, offset: int) -> None:
        piece = self.view[offset : offset + self.chunk]
        if self.verify:
            checksum(piece)
        self.file.write(piece, self.slot.offset + offset)

    def read(self, offset: int) -> None:
        piece = self.view[offset : offset + self.chunk]
        self.file.read(piece, self.slot.offset + offset)
        if self.verify:
            checksum(piece)

    def timed(self, pool: ThreadPoolExecutor, move) -> float:
        begin = time.perf_counter()
        list(pool.map(move, self.offsets))
        return time.perf_counter() - begin

    @contextlib.contextmanager
    def busy(self) -> Iterator[Callable[[], int]]:
        """Threads writing and reading the probe in a loop; yields the bytes they have moved."""
        stop = threading.Event()
        moved = [0] * self.threads

        def loop(i: int) -> None:
            mine = self.offsets[i :: self.threads]
            while not stop.is_set():
                for move in (self.write, self.read):
                    for offset in mine:
                        move(offset)
                        moved[i] += self.chunk

        workers = [threading.Thread(target=loop, args=(i,)) for i in range(self.threads)]
        for worker in workers:
            worker.start()
        try:
            yield lambda: sum(moved)
        finally:
            stop.set()
            for worker in workers:
                worker.join()


def _measure_disk(drive: Drive, config: EngineConfig) -> tuple[float, float, float]:
    """Write then read a probe file, then measure what that I/O costs compute.

    Writes are timed as the engine issues them, without a sync. In buffered
    mode the written pages are synced and dropped from the page cache before
    the reads, so these measure the device: the page cache is memory that
    offloading is meant to free, and it may not hold the bytes by backward.
    """
    chunk = config.chunk_bytes
    nbytes = max(min(DISK_PROBE_BYTES, drive.free_bytes() // 4) // chunk, 1) * chunk
    file = OffloadFile(drive.directory, direct=drive.file.direct, name="probe.bin")
    try:
        probe = _ProbeIO(config, file, nbytes)
        with ThreadPoolExecutor(probe.threads) as pool:
            wrote = probe.timed(pool, probe.write)
            if not file.direct:
                file.sync()
                file.drop_cache()
            read = probe.timed(pool, probe.read)
        lost = _compute_seconds_lost_per_byte(probe)
    finally:
        file.close()
    rates = (nbytes / wrote, nbytes / read, lost)
    log.info(
        "disk of %s: write %.2f GB/s, read %.2f GB/s, I/O takes %.2f ms of CPU compute per GB",
        drive.root,
        rates[0] / 1e9,
        rates[1] / 1e9,
        rates[2] * 1e12,
    )
    return rates


INTERFERENCE_SECONDS = 0.2
"""How long the compute loop of the interference probe runs, alone and beside the I/O."""
INTERFERENCE_PAIRS = 3
"""Runs alone and beside the I/O, in turn; the median of their differences is taken."""


def _compute_seconds_lost_per_byte(probe: _ProbeIO) -> float:
    """How much longer a matmul loop on torch's threads takes per byte the I/O threads move
    meanwhile.

    This is what offloading costs a CPU device whose cores compute: the I/O
    threads' own CPU time, and the waits of a parallel kernel whose threads
    lose a core to them (each kernel ends with its slowest thread). Neither is
    visible in the I/O threads' CPU time alone.
    """
    a = torch.randn(512, 512)
    once = _best_time(lambda: torch.mm(a, a), torch.device("cpu"))
    reps = max(int(INTERFERENCE_SECONDS / once), 1)

    def work() -> float:
        begin = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, a)
        return time.perf_counter() - begin

    lost = []
    for _ in range(INTERFERENCE_PAIRS):
        alone = work()
        with probe.busy() as moved:
            before = moved()
            beside_io = work()
            nbytes = moved() - before
        lost.append(max(beside_io - alone, 0.0) / max(nbytes, 1))
    return statistics.median(lost)


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


def cached_rates(directory: str | None = None) -> dict[str, tuple[float, ...]]:
    """The rates measured so far and cached in ``cache_path()``, by cache key.

    A key says what was measured: ``compute:<device>:...`` (``compute_rates``'s
    four numbers) or ``disk:<file system>:<I/O mode>:...`` (``disk_rates``'s
    three). With ``directory``, only the compute rates and the disk rates of the
    file system that holds ``directory``. Empty when there is no cache yet;
    entries that are not valid rates are left out.
    """
    prefixes = ("compute:", "disk:")
    if directory is not None:
        prefixes = ("compute:", f"disk:{file_system(directory)}:")
    return {
        key: tuple(float(v) for v in value)
        for key, value in _read_table().items()
        if key.startswith(prefixes) and _valid(value)
    }


def _cached(key: str, count: int) -> tuple[float, ...] | None:
    value = _read_table().get(key)
    if _valid(value) and len(value) == count:
        return tuple(float(v) for v in value)
    return None


def _read_table() -> dict:
    """The cache file's table; empty if there is none or it is not a table."""
    try:
        with open(cache_path()) as f:
            table = json.load(f)
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _valid(value: object) -> bool:
    """Two positive rates, then numbers >= 0 (a cost after the rates may be 0)."""
    return (
        isinstance(value, list)
        and len(value) >= 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
        and min(value[:2]) > 0
    )


def _remember(key: str, rates: tuple[float, ...]) -> None:
    """Add ``key`` to the cache file; atomic, so concurrent processes never see half a file."""
    path = cache_path()
    table = _read_table()
    table[key] = list(rates)
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".costs-", dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1)
        os.replace(tmp, path)
