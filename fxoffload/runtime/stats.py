"""Process-wide counters of what the engines did, read by ``fxoffload.stats()``."""

from __future__ import annotations

import dataclasses
import threading


@dataclasses.dataclass(frozen=True)
class OffloadStats:
    """A snapshot of the counters, summed over every engine of this process.

    Counters grow until :func:`reset_stats`; ``handles_live`` and
    ``files_on_disk`` are gauges of what is held right now and are never reset.
    """

    tensors_stored: int = 0
    """Tensors handed to ``store``."""
    bytes_written: int = 0
    """Bytes that reached an offload file."""
    bytes_read: int = 0
    """Bytes read back from offload files."""
    tensors_forwarded: int = 0
    """Waits served from memory, because the tensor was still there: no read."""
    io_errors: int = 0
    """Writes that failed; the tensor was kept in memory instead."""
    handles_live: int = 0
    """Stored tensors whose handle is still alive (their graph is not freed yet)."""
    files_on_disk: int = 0
    """Offload files that exist right now."""


_COUNTERS = ("tensors_stored", "bytes_written", "bytes_read", "tensors_forwarded", "io_errors")
_lock = threading.Lock()
_values: dict[str, int] = {f.name: 0 for f in dataclasses.fields(OffloadStats)}


def add(name: str, amount: int = 1) -> None:
    """Add ``amount`` (may be negative for gauges) to one counter."""
    with _lock:
        _values[name] += amount


def snapshot() -> OffloadStats:
    with _lock:
        return OffloadStats(**_values)


def reset() -> None:
    """Zero the counters; gauges keep describing what is held."""
    with _lock:
        for name in _COUNTERS:
            _values[name] = 0
