"""Process-wide counters of what the engines did, read by ``fxoffload.stats()``."""

from __future__ import annotations

import dataclasses

from fxoffload.runtime.locks import RuntimeLock


@dataclasses.dataclass(frozen=True)
class OffloadStats:
    """A snapshot of what the engines of this process did and hold (``fxoffload.stats()``).

    A frozen dataclass: read fields as attributes (``stats().bytes_written``)
    or all of them as a dict (:meth:`as_dict`). Counters grow until
    ``fxoffload.reset_stats()``. The last five fields are gauges of what is
    held right now and are never reset.
    """

    tensors_stored: int = 0
    """Tensors handed to ``store``."""
    bytes_written: int = 0
    """Bytes written to offload files (slots are padded to 4 KiB)."""
    bytes_read: int = 0
    """Bytes read back from offload files."""
    tensors_forwarded: int = 0
    """Waits served from memory, because the tensor was still there: no read."""
    io_errors: int = 0
    """Writes that failed; the tensor was kept in memory instead."""
    store_waits: int = 0
    """Stores that waited because ``max_inflight_bytes`` were already waiting to be written."""
    store_wait_ns: int = 0
    """Total time those stores waited."""
    wait_stalls: int = 0
    """Waits that blocked: their read (or, forwarding, their write) had not finished yet."""
    wait_stall_ns: int = 0
    """Total time those waits blocked the caller: I/O the schedule did not hide."""
    staging_reused: int = 0
    """Stores that copied into a kept staging buffer instead of fresh memory."""
    io_cpu_ns: int = 0
    """CPU time the I/O threads spent moving and checksumming chunks: on a CPU device,
    taken from the cores that compute."""
    handles_live: int = 0
    """Stored tensors whose graph still holds a handle to them."""
    slot_bytes_in_use: int = 0
    """Bytes of offload files that hold live tensors."""
    file_bytes: int = 0
    """Size of the offload files (their high-water mark: freed slots are reused)."""
    staging_bytes_held: int = 0
    """Idle staging and read buffers kept for reuse (``staging_pool_bytes``): host
    memory offloading holds between steps, where the next step's stores and reads
    take their buffers from."""
    io_mode: str = ""
    """``"direct"`` (O_DIRECT), ``"buffered"``, or both, over the engines in use."""

    def as_dict(self) -> dict[str, int | str]:
        """The fields by name, as ``stats().as_dict()["handles_live"]``."""
        return dataclasses.asdict(self)


COUNTERS = (
    "tensors_stored",
    "bytes_written",
    "bytes_read",
    "tensors_forwarded",
    "io_errors",
    "store_waits",
    "store_wait_ns",
    "wait_stalls",
    "wait_stall_ns",
    "staging_reused",
    "io_cpu_ns",
)
_lock = RuntimeLock()  # counters() allocates under it: a collection may run a finalizer there
_values: dict[str, int] = dict.fromkeys(COUNTERS, 0)


def add(name: str, amount: int = 1) -> None:
    with _lock:
        _values[name] += amount


def counters() -> dict[str, int]:
    with _lock:
        return dict(_values)


def reset() -> None:
    with _lock:
        for name in COUNTERS:
            _values[name] = 0
