"""Process-wide counters of what the engines did, read by ``fxoffload.stats()``."""

from __future__ import annotations

import dataclasses

from fxoffload.runtime.locks import RuntimeLock


def _counter() -> dataclasses.Field:
    return dataclasses.field(default=0, metadata={"gauge": False})


def _counter_by_dir() -> dataclasses.Field:
    """A counter per offload directory (as ``offload_dir`` names it)."""
    return dataclasses.field(default_factory=dict, metadata={"gauge": False})


def _gauge(default: int | str) -> dataclasses.Field:
    """A field of what is held right now, never reset."""
    return dataclasses.field(default=default, metadata={"gauge": True})


@dataclasses.dataclass(frozen=True)
class OffloadStats:
    """A snapshot of what the engines of this process did and hold (``fxoffload.stats()``).

    A frozen dataclass: read fields as attributes (``stats().bytes_written``)
    or all of them as a dict (:meth:`as_dict`). Counters grow until
    ``fxoffload.reset_stats()``; the gauges (``handles_live`` to ``io_mode``)
    say what is held right now and are never reset.
    """

    tensors_stored: int = _counter()
    """Tensors handed to ``store``."""
    bytes_written: int = _counter()
    """Bytes written to offload files (slots are padded to 4 KiB)."""
    bytes_read: int = _counter()
    """Bytes read back from offload files."""
    bytes_written_by_dir: dict[str, int] = _counter_by_dir()
    """``bytes_written`` by offload directory."""
    bytes_read_by_dir: dict[str, int] = _counter_by_dir()
    """``bytes_read`` by offload directory."""
    tensors_forwarded: int = _counter()
    """Waits served from memory, because the tensor was still there: no read."""
    io_errors: int = _counter()
    """Writes that failed; the tensor was kept in memory instead."""
    store_waits: int = _counter()
    """Stores that waited because ``max_inflight_bytes`` were already waiting to be written."""
    store_wait_ns: int = _counter()
    """Total time those stores waited."""
    wait_stalls: int = _counter()
    """Waits that blocked: their read (or, forwarding, their write) had not finished yet."""
    wait_stall_ns: int = _counter()
    """Total time those waits blocked the caller: I/O the schedule did not hide."""
    staging_reused: int = _counter()
    """Stores that copied into a kept staging buffer instead of fresh memory."""
    io_cpu_ns: int = _counter()
    """CPU time the I/O threads spent moving and checksumming chunks: on a CPU device,
    taken from the cores that compute."""
    handles_live: int = _gauge(0)
    """Stored tensors whose graph still holds a handle to them."""
    slot_bytes_in_use: int = _gauge(0)
    """Bytes of offload files that hold live tensors."""
    file_bytes: int = _gauge(0)
    """Size of the offload files (their high-water mark: freed slots are reused)."""
    staging_bytes_held: int = _gauge(0)
    """Idle staging and read buffers kept for reuse (``staging_pool_bytes``): host
    memory offloading holds between steps, where the next step's stores and reads
    take their buffers from."""
    io_mode: str = _gauge("")
    """``"direct"`` (O_DIRECT), ``"buffered"``, or both, over the engines in use."""

    def as_dict(self) -> dict[str, int | str]:
        """The fields by name, as ``stats().as_dict()["handles_live"]``."""
        return dataclasses.asdict(self)


_lock = RuntimeLock()  # counters() allocates under it: a collection may run a finalizer there
_values: dict[str, int] = {}
_by_dir: dict[str, dict[str, int]] = {}


def add(name: str, amount: int = 1) -> None:
    with _lock:
        _values[name] += amount


def add_for(directory: str, name: str, amount: int) -> None:
    """Add to counter ``name`` and to its count for ``directory`` (``<name>_by_dir``)."""
    with _lock:
        _values[name] += amount
        per_dir = _by_dir[f"{name}_by_dir"]
        per_dir[directory] = per_dir.get(directory, 0) + amount


def counters() -> dict[str, int | dict[str, int]]:
    with _lock:
        return {**_values, **{name: dict(counts) for name, counts in _by_dir.items()}}


def reset() -> None:
    with _lock:
        for field in dataclasses.fields(OffloadStats):
            if field.metadata["gauge"]:
                continue
            if field.default_factory is dict:
                _by_dir[field.name] = {}
            else:
                _values[field.name] = 0


reset()
