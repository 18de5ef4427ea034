"""The offload engine: moves tensors to files and back on worker threads.

Usable without any compiler::

    engine = Engine("/nvme/x")
    h = engine.store(t)      # copies t, starts writing it, returns a handle
    engine.prefetch(h)       # starts reading it back (optional)
    t2 = engine.wait(h)      # t2 has t's shape, strides and bytes

``store`` copies the tensor into a staging buffer the engine owns before it
returns. That copy is what makes the engine safe under a compiler: inductor
reuses an intermediate's memory for later buffers as soon as the graph stops
using it, so the engine may not write from the caller's memory after ``store``
returns. The staging buffer is dropped as soon as its write completes, which
is where the memory saving comes from.

An entry lives until its handle dies (see ``handles.py``); only then is its
file removed, so a retained graph can be waited on any number of times.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from fxoffload.runtime import files, stats
from fxoffload.runtime.handles import handle_id, make_handle

_entry_ids = itertools.count(1)


@dataclasses.dataclass(eq=False)
class _Entry:
    """One stored tensor: its layout, where its bytes are, and what is in flight."""

    id: int
    path: str
    shape: tuple[int, ...]
    dim_order: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    nbytes: int
    staging: torch.Tensor | None
    """The engine's copy, kept until the write succeeds (forever if it failed)."""
    write: Future[None] | None = None
    write_error: OSError | None = None
    on_disk: bool = False
    read: Future[torch.Tensor] | None = None
    """A prefetch in flight or done, consumed by the next ``wait``."""
    released: bool = False


class Engine:
    """Stores tensors in files under a private directory of ``root``.

    Args:
        root: an existing, writable directory (the ``offload_dir`` option).
        io_threads: worker threads that write and read files.
    """

    def __init__(self, root: str, io_threads: int = 2) -> None:
        self.root = root
        self.directory = files.make_private_dir(root)
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="fxoffload-io")
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        self._warned = False
        self._closed = False

    # -- the three operations -------------------------------------------------

    def store(self, t: torch.Tensor, dim_order: Sequence[int] | None = None) -> torch.Tensor:
        """Start writing ``t`` to a file and return its handle.

        ``dim_order`` (outermost dimension first, as ``Tensor.dim_order()``)
        fixes the layout that ``wait`` gives back; by default ``t``'s own.
        """
        if self._closed:
            raise RuntimeError(f"fxoffload engine for {self.root!r} is closed")
        order = tuple(dim_order) if dim_order is not None else tuple(t.dim_order())
        staging = torch.empty_permuted(
            t.shape, order, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda
        )
        staging.copy_(t)
        entry = _Entry(
            id=next(_entry_ids),
            path="",
            shape=tuple(t.shape),
            dim_order=order,
            dtype=t.dtype,
            device=t.device,
            nbytes=staging.numel() * staging.element_size(),
            staging=staging,
        )
        entry.path = os.path.join(self.directory, f"{entry.id}.bin")
        with self._lock:
            self._entries[entry.id] = entry
            entry.write = self._pool.submit(self._write, entry, staging)
        stats.add("tensors_stored")
        stats.add("handles_live")
        return make_handle(entry.id, entry.shape, self._release)

    def prefetch(self, handle: torch.Tensor) -> None:
        """Start reading the tensor back, unless it is still in memory or already read."""
        entry = self._entry(handle)
        with self._lock:
            if entry.staging is not None or entry.read is not None:
                return
            entry.read = self._pool.submit(self._read, entry)

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        """Return the stored tensor, on its original device and with its layout.

        If the engine still holds the bytes (the write has not finished), they
        are handed over directly once the write is done: no read
        ("forwarding"). The file copy stays valid either way, so a second
        ``wait`` on the same handle (``retain_graph=True``) reads it again.
        """
        entry = self._entry(handle)
        with self._lock:
            staging, write, read = entry.staging, entry.write, entry.read
            entry.read = None
        if staging is not None:
            assert write is not None
            write.result()
            with self._lock:
                kept = entry.write_error is not None
            # After a failed write the staging buffer is the only copy: hand out a copy of it.
            out = staging.clone() if kept else staging
            stats.add("tensors_forwarded")
        elif read is not None:
            out = read.result()
        else:
            out = self._read(entry)
        return out.to(entry.device, non_blocking=True) if entry.device.type != "cpu" else out

    # -- bookkeeping -----------------------------------------------------------

    def live_entries(self) -> int:
        """Entries whose handle is still alive."""
        with self._lock:
            return len(self._entries)

    def owns(self, entry_id: int) -> bool:
        with self._lock:
            return entry_id in self._entries

    def close(self) -> None:
        """Finish or cancel pending I/O and remove the private directory."""
        with self._lock:
            self._closed = True
            dropped = len(self._entries)
            self._entries.clear()
        stats.add("handles_live", -dropped)
        self._pool.shutdown(wait=True, cancel_futures=True)
        files.remove_private_dir(self.directory)

    def _entry(self, handle: torch.Tensor) -> _Entry:
        entry_id = handle_id(handle)
        with self._lock:
            entry = self._entries.get(entry_id)
        if entry is None:
            raise RuntimeError(
                f"fxoffload: handle #{entry_id} is not live in the engine for {self.root!r}"
            )
        return entry

    # -- worker-thread jobs ----------------------------------------------------

    def _write(self, entry: _Entry, staging: torch.Tensor) -> None:
        try:
            written = files.write_file(entry.path, staging)
        except OSError as err:
            with self._lock:
                entry.write_error = err
                warn = not self._warned
                self._warned = True
            stats.add("io_errors")
            if warn:
                warnings.warn(
                    f"fxoffload: writing {entry.path} failed ({err}); keeping the tensor "
                    f"in memory instead ({entry.nbytes} bytes). Gradients are unaffected; "
                    "fxoffload.stats().io_errors counts every such tensor.",
                    RuntimeWarning,
                    stacklevel=1,
                )
            return
        stats.add("bytes_written", written)
        stats.add("files_on_disk")
        with self._lock:
            released = entry.released
            if not released:
                entry.on_disk = True
                entry.staging = None
        if released:
            self._unlink(entry.path)

    def _read(self, entry: _Entry) -> torch.Tensor:
        out = torch.empty_permuted(
            entry.shape,
            entry.dim_order,
            dtype=entry.dtype,
            device="cpu",
            pin_memory=entry.device.type == "cuda",
        )
        try:
            read = files.read_file(entry.path, out)
        except OSError as err:
            raise RuntimeError(
                f"fxoffload: cannot read back offloaded tensor #{entry.id} "
                f"(shape {list(entry.shape)}, {entry.dtype}) from {entry.path}: {err}"
            ) from err
        stats.add("bytes_read", read)
        return out

    def _release(self, entry_id: int) -> None:
        """Called when a handle's storage dies, from whichever thread dropped it."""
        with self._lock:
            entry = self._entries.pop(entry_id, None)
            if entry is None:
                return
            entry.released = True
            entry.staging = None
            entry.read = None
            on_disk, write = entry.on_disk, entry.write
        stats.add("handles_live", -1)
        if write is not None and write.cancel():
            return
        if on_disk:
            self._unlink(entry.path)

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        stats.add("files_on_disk", -1)
