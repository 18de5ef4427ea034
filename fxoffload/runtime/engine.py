"""The offload engine: moves tensors to one file and back on worker threads.

Usable without any compiler::

    engine = Engine("/nvme/x")
    h = engine.store(t)      # copies t, starts writing it, returns a handle
    engine.prefetch(h)       # starts reading it back (optional)
    t2 = engine.wait(h)      # t2 has t's shape, strides and bytes

``store`` copies the tensor into an aligned staging buffer the engine owns
before it returns (``host_staging.py``). That copy is what makes the engine
safe under a compiler: inductor reuses an intermediate's memory for later
buffers as soon as the graph stops using it, so the engine may not write from
the caller's memory after ``store`` returns. A staging buffer is dropped as
soon as its write completes, which is where the memory saving comes from;
``max_inflight_bytes`` bounds how many bytes wait to be written.

Each tensor is split into chunks written and read by several threads
(``transfers.py``) at positional offsets of one preallocated file
(``offload_file.py``), with direct I/O where the file system allows it.

An entry lives until every handle to it dies (see ``handles.py``); only then
is its slot freed, so a retained graph can be waited on any number of times.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from fxoffload.options import IO_OPTIONS, check_fields, config_fields
from fxoffload.runtime import private_dir, stats
from fxoffload.runtime.handles import handle_id, make_handle
from fxoffload.runtime.host_staging import HostStaging, PageableStaging, PinnedStaging, view_as
from fxoffload.runtime.locks import RuntimeLock
from fxoffload.runtime.offload_file import OffloadFile
from fxoffload.runtime.slots import Slot
from fxoffload.runtime.staging import StagingPool
from fxoffload.runtime.transfers import ChunkedFile, Transfer

_entry_ids = itertools.count(1)


EngineConfig = dataclasses.make_dataclass(
    "EngineConfig",
    config_fields(IO_OPTIONS),
    frozen=True,
    namespace={
        "__doc__": "How an engine does I/O: the I/O options of ``fxoffload.config``, which "
        "documents each and holds its default, checked as ``Options`` checks them.",
        "__post_init__": check_fields,
        "__module__": __name__,
    },
)


class WriteState(enum.Enum):
    """Where an entry's write is; it leaves WRITING once, in ``Engine._finish_write``."""

    WRITING = "writing"
    """Chunks queued or running; the staging copy holds the bytes (and forwards them)."""
    WRITTEN = "written"
    """On disk: every chunk written, or cancelled because the handle died first."""
    FAILED = "failed"
    """Not on disk; the staging copy, kept for good, is the only one (``write_error`` says why)."""


@dataclasses.dataclass(eq=False)
class _Entry:
    """One stored tensor: its layout, its slot, its write's state and what is in flight.

    Fields change under the engine lock. ``staging`` is held while WRITING
    (unless a forwarding wait took it), dropped or pooled once WRITTEN, kept
    when FAILED; ``read`` is the read in flight, if any (only once WRITTEN).
    """

    id: int
    shape: tuple[int, ...]
    dim_order: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    nbytes: int
    host: HostStaging
    """How the bytes are staged in host memory and restored (by the device's kind)."""
    slot: Slot | None = None
    staging: torch.Tensor | None = None
    """The engine's aligned copy (uint8), kept until the write succeeds (forever if it failed)."""
    copied: torch.cuda.Event | None = None
    """Marks the copy into ``staging`` done, where it is queued (CUDA: on the caller's stream)."""
    staging_shared: bool = False
    """CUDA: a device copy was made from ``staging`` before its write ended; never pool it."""
    write: Transfer | None = None
    state: WriteState = WriteState.WRITING
    write_error: BaseException | None = None
    read: Transfer | None = None
    released: bool = False
    """The handle died: the slot is freed as soon as nothing is writing it."""
    checksums: list[int] = dataclasses.field(default_factory=list)
    """The checksum of each written chunk (``checksum.py``), when verifying."""


class Engine:
    """Stores tensors in one file under a private directory of ``root``.

    Args:
        root: an existing, writable directory (the ``offload_dir`` option).
        config: threads, chunk size, in-flight cap and I/O mode.
    """

    def __init__(self, root: str, config: EngineConfig | None = None) -> None:
        self.root = root
        self.config = config or EngineConfig()
        self._private_dir = private_dir.make_private_dir(root)
        self.directory = self._private_dir.path
        direct = {"auto": None, "direct": True, "buffered": False}[self.config.io_mode]
        try:
            self.file = OffloadFile(self.directory, direct=direct)
        except OSError as e:
            self._private_dir.remove()
            raise ValueError(
                f"fxoffload cannot use {self.config.io_mode} I/O in offload_dir {root!r}: {e}"
            ) from e
        self._pool = ThreadPoolExecutor(self.config.io_threads, thread_name_prefix="fxoffload-io")
        self._chunked = ChunkedFile(
            self.file, self._pool, self.config.chunk_bytes, verify=self.config.verify
        )
        self._staging = StagingPool(self.config.staging_pool_bytes)
        self._pageable = PageableStaging(self._staging)
        self._pinned = PinnedStaging(self._staging)
        self._lock = RuntimeLock()  # see locks.py: a handle's finalizer takes it
        self._inflight_changed = threading.Condition(self._lock)
        self._inflight = 0
        self._entries: dict[int, _Entry] = {}
        self._warned = False
        self._closed = False
        self._live_at_close: frozenset[int] = frozenset()
        """Entries whose handles outlived the engine: found, to be told it is closed."""

    # -- the three operations -------------------------------------------------

    def store(self, t: torch.Tensor, dim_order: Sequence[int] | None = None) -> torch.Tensor:
        """Start writing ``t`` and return its handle.

        ``dim_order`` (outermost dimension first, as ``Tensor.dim_order()``)
        fixes the layout that ``wait`` gives back; by default ``t``'s own.

        Every store is written, even of bytes stored before: the same live
        tensor at the same version is no proof of the same bytes, since
        inductor's kernels reuse a dead buffer in place without bumping its
        version counter. Saved values that alias each other are for the
        passes to find, in the graph.
        """
        if self._closed:
            raise self._closed_error()
        order = tuple(dim_order) if dim_order is not None else tuple(t.dim_order())

        nbytes = t.numel() * t.element_size()
        self._reserve_inflight(nbytes)
        entry = None
        try:
            host = self._pinned if t.is_cuda else self._pageable
            buffer, copied = host.copy_in(t, order)
            entry = _Entry(
                id=next(_entry_ids),
                shape=tuple(t.shape),
                dim_order=order,
                dtype=t.dtype,
                device=t.device,
                nbytes=nbytes,
                host=host,
                staging=buffer,
                copied=copied,
            )
            with self._lock:
                self._entries[entry.id] = entry
            self._start_write(entry, buffer, copied)
        except BaseException:
            self._forget(entry, nbytes)
            raise
        stats.add("tensors_stored")
        return make_handle(entry.id, entry.shape, self._release)

    def prefetch(self, handle: torch.Tensor) -> None:
        """Start reading the tensor back, unless it is still in memory or already read."""
        entry = self._entry(handle)
        read = None
        with self._lock:
            # Before the write settles the bytes are in memory (and a read
            # could overtake the write of its own slot).
            if entry.state is WriteState.WRITTEN and entry.read is None:
                read = self._claim_read(entry)
        if read is not None:
            self._start_read(entry, *read)

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        """Return the stored tensor, on its original device and with its layout.

        If the engine still holds the bytes (the write has not finished), they
        are handed over once the write is done (on a GPU at once, as a device
        copy: see ``_forward_to_device``): no read ("forwarding"). The
        slot stays valid either way, so a second ``wait`` on the same handle
        (``retain_graph=True``) reads it again.
        """
        entry = self._entry(handle)
        assert entry.write is not None
        if entry.host.copies_out:
            with self._lock:
                failed = entry.state is WriteState.FAILED
            if failed:
                self._check_keep(entry)  # a failed write under on_io_error="raise" raises
            with self._lock:
                staging = entry.staging
                entry.staging_shared |= staging is not None
            if staging is not None:
                return self._forward_to_device(entry, staging)
        with self._lock:
            claimed = entry.staging if entry.state is WriteState.WRITING else None
            entry.staging = None if claimed is not None else entry.staging
        if claimed is not None:
            # Forwarding: this waiter alone gets the engine's copy, once written.
            entry.write.wait()
            with self._lock:
                failed = entry.state is WriteState.FAILED
                if failed:
                    entry.staging = claimed
            if failed:
                out = self._kept_copy(entry, claimed)
            else:
                out = view_as(claimed, *self._layout(entry))
                stats.add("tensors_forwarded")
        else:
            out = self._wait_written(entry)
        return entry.host.to_device(out, entry.device)

    def _forward_to_device(self, entry: _Entry, staging: torch.Tensor) -> torch.Tensor:
        """A device copy of the pinned staging bytes, queued after the store's copy into them.

        It leaves the buffer untouched, so it need not wait for the write (the
        host runs ahead of the device: backward often waits before the write
        could start); the buffer then goes to the caching host allocator,
        which tracks the copy, not to the pool. Also the way back after a
        failed write under ``on_io_error="keep"``.
        """
        assert isinstance(entry.host, PinnedStaging) and entry.copied is not None
        stats.add("tensors_forwarded")
        return entry.host.copy_out(
            view_as(staging, *self._layout(entry)), entry.copied, entry.device
        )

    def _check_keep(self, entry: _Entry) -> None:
        """Raise the failed write of ``entry`` unless ``on_io_error`` is "keep"."""
        if self.config.on_io_error == "raise":
            assert entry.write_error is not None
            raise self._io_error("could not write", entry, entry.write_error)

    def _kept_copy(self, entry: _Entry, kept: torch.Tensor) -> torch.Tensor:
        """A FAILED entry's tensor: a copy of its kept staging bytes, the only ones there are."""
        self._check_keep(entry)
        stats.add("tensors_forwarded")
        return view_as(kept.clone(), *self._layout(entry))

    def _wait_written(self, entry: _Entry) -> torch.Tensor:
        """The tensor of an entry whose staging copy someone else has, or that was dropped."""
        entry.write.wait()  # a read must never overtake the write of its slot
        started = None
        with self._lock:
            kept = entry.staging if entry.state is WriteState.FAILED else None
            if kept is None and entry.read is None:
                started = self._claim_read(entry)
            read = entry.read
            entry.read = None
        if started is not None:
            self._start_read(entry, *started)
        if kept is not None:
            return self._kept_copy(entry, kept)
        assert read is not None and read.buffer is not None
        error = read.wait()
        if error is not None:
            raise self._io_error("cannot read back", entry, error) from error
        return view_as(read.buffer, *self._layout(entry))

    # -- bookkeeping -----------------------------------------------------------

    def live_entries(self) -> int:
        """Entries whose handle is still alive."""
        with self._lock:
            return len(self._entries)

    @property
    def inflight_bytes(self) -> int:
        """Bytes stored whose write has not finished (bounded by ``max_inflight_bytes``)."""
        with self._lock:
            return self._inflight

    @property
    def staging_bytes_held(self) -> int:
        """Bytes of idle buffers the staging pool keeps for reuse."""
        return self._staging.held_bytes

    def owns(self, entry_id: int) -> bool:
        with self._lock:
            return entry_id in self._entries or entry_id in self._live_at_close

    def close(self) -> None:
        """Finish pending I/O and remove the private directory (idempotent).

        Queued chunks run rather than being cancelled: a thread may be in
        ``wait`` for one of them. (A released entry's chunks were cancelled
        when its handle died, so only live entries' I/O is left.)
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._live_at_close = frozenset(self._entries)
            self._entries.clear()
        self._pool.shutdown(wait=True)
        self._staging.clear()
        self.file.close()
        self._private_dir.remove()

    @staticmethod
    def _layout(entry: _Entry) -> tuple:
        return entry.shape, entry.dim_order, entry.dtype

    def _entry(self, handle: torch.Tensor) -> _Entry:
        entry_id = handle_id(handle)
        with self._lock:
            if self._closed:
                raise self._closed_error()
            entry = self._entries.get(entry_id)
        if entry is None:
            raise RuntimeError(
                f"fxoffload: handle #{entry_id} is not live in the engine for {self.root!r}"
            )
        return entry

    def _reserve_inflight(self, nbytes: int) -> None:
        """Block while writing ``nbytes`` more would exceed ``max_inflight_bytes``.

        A tensor larger than the cap alone still goes through, by itself.
        """
        cap = self.config.max_inflight_bytes
        with self._lock:
            if self._inflight and self._inflight + nbytes > cap:
                started = time.perf_counter()
                while self._inflight and self._inflight + nbytes > cap:
                    self._inflight_changed.wait()
                stats.add("store_waits")
                stats.add("store_wait_ns", int((time.perf_counter() - started) * 1e9))
            self._inflight += nbytes

    # -- I/O ---------------------------------------------------------------------

    def _start_write(self, entry: _Entry, buffer: torch.Tensor, copied) -> None:
        try:
            entry.slot = self.file.allocate(entry.nbytes)
        except OSError as err:
            if self.config.on_io_error == "raise":
                raise self._io_error("no room for", entry, err) from err
            entry.write = Transfer(1, lambda e: self._finish_write(entry, e))
            entry.write.chunk_done(err)
            return
        slot = entry.slot
        entry.checksums = [0] * self._chunked.n_chunks(slot)
        entry.write = Transfer(
            len(entry.checksums),
            lambda err: self._finish_write(entry, err),
            buffer,
            drop_buffer=True,
        )
        ready = copied.synchronize if copied is not None else None
        self._queue(self._chunked.write, entry.write, slot, entry.checksums, ready)

    def _forget(self, entry: _Entry | None, nbytes: int) -> None:
        """Undo a store that raised: no entry, and its reservation given back.

        A write that settled gave it back itself (a failed one in keep mode,
        whose warning ``-W error`` raises); otherwise nothing is being written,
        and a reservation kept would have later stores wait for bytes that
        never land.
        """
        with self._lock:
            if entry is not None:
                self._entries.pop(entry.id, None)
            if entry is None or entry.state is WriteState.WRITING:
                self._inflight -= nbytes
                self._inflight_changed.notify_all()

    def _closed_error(self) -> RuntimeError:
        return RuntimeError(f"fxoffload engine for {self.root!r} is closed")

    def _io_error(self, what: str, entry: _Entry, err: BaseException) -> RuntimeError:
        free = shutil.disk_usage(self.directory).free
        return RuntimeError(
            f"fxoffload: {what} offloaded tensor #{entry.id} ({entry.nbytes} bytes, shape "
            f"{list(entry.shape)}, {entry.dtype}) in {self.file.path} ({free} bytes free "
            f"in {self.directory}): {err}"
        )

    def _finish_write(self, entry: _Entry, error: BaseException | None) -> None:
        staging = None
        with self._lock:
            entry.state = WriteState.WRITTEN if error is None else WriteState.FAILED
            released = entry.released
            if error is not None:
                entry.write_error = error
                warn = not self._warned
                self._warned = True
            else:
                # Unless a forwarding wait took it (then it is the restored tensor's
                # memory), nobody holds the copy now: it can stage another store.
                staging, entry.staging = entry.staging, None
                if entry.staging_shared:  # a device copy may still be reading it
                    staging = None
                elif not entry.host.reusable(entry.copied):
                    staging = None
        try:
            if staging is not None:
                self._staging.give(staging, pin_memory=entry.host.pinned)
                del staging  # freed now unless the pool kept it: before the bytes count as written
        finally:  # whatever the pool raises, later stores must not wait for these bytes
            with self._lock:
                self._inflight -= entry.nbytes
                self._inflight_changed.notify_all()
            if released:
                self._free_slot(entry)
        if error is not None:
            stats.add("io_errors")
            if warn:  # last: under -W error it raises, and nothing may be left undone
                warnings.warn(
                    f"fxoffload: writing to {self.file.path} failed ({error}); keeping the "
                    f"tensor in memory instead ({entry.nbytes} bytes). Gradients are "
                    "unaffected; fxoffload.stats().io_errors counts every such tensor.",
                    RuntimeWarning,
                    stacklevel=1,
                )

    def _claim_read(self, entry: _Entry) -> tuple[Transfer, Slot]:
        """Make ``entry``'s read, for :meth:`_start_read` to start (the lock held)."""
        assert entry.slot is not None
        entry.read = Transfer(self._chunked.n_chunks(entry.slot), lambda err: None)
        return entry.read, entry.slot

    def _start_read(self, entry: _Entry, read: Transfer, slot: Slot) -> None:
        """Take a claimed read's buffer and queue its chunks, without the engine lock:
        allocating faults pages in, which must not stall ``store`` and the I/O threads."""
        try:
            read.buffer = entry.host.read_buffer(entry.nbytes)
        except BaseException as err:
            read.settle(self._chunked.n_chunks(slot), err)
            raise
        self._queue(self._chunked.read, read, slot, entry.checksums)

    def _queue(self, submit: Callable[..., None], *args: object) -> None:
        """Queue a transfer's chunks; a pool shut down since the entry was found means closed."""
        try:
            submit(*args)
        except RuntimeError as err:
            if self._closed:
                raise self._closed_error() from err
            raise

    def _release(self, entry_id: int) -> None:
        """Called when a handle's storage dies, from whichever thread dropped it."""
        with self._lock:
            entry = self._entries.get(entry_id)
            if entry is None:
                return
            del self._entries[entry_id]
            entry.released = True
            write, read = entry.write, entry.read
            entry.read = None
            writing = entry.state is WriteState.WRITING
            if not writing:
                entry.staging = None
        if read is not None:
            read.cancel()
        if writing:
            assert write is not None
            write.cancel()  # the last chunk to settle frees the slot
        else:
            self._free_slot(entry)

    def _free_slot(self, entry: _Entry) -> None:
        if entry.slot is not None:
            self.file.free(entry.slot)
            entry.slot = None
