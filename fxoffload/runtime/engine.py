"""The offload engine: moves tensors to files and back on worker threads.

Usable without any compiler::

    engine = Engine("/nvme/x")       # or Engine(["/nvme0/x", "/nvme1/x"])
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

Each offload directory is a drive (``drives.py``) with its own file and
threads; a tensor is split into one share per drive it goes to, in
proportion to the drives' write rates, and each share into chunks written
and read by the drive's threads (``transfers.py``) at positional offsets of
its preallocated file (``offload_file.py``), with direct I/O where the file
system allows it.

An entry lives until every handle to it dies (see ``handles.py``); only then
are its slots freed, so a retained graph can be waited on any number of times.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import threading
import time
import warnings
from collections.abc import Callable, Sequence

import torch

from fxoffload.runtime import probe, stats
from fxoffload.runtime.drives import Drive, Striping, open_drives
from fxoffload.runtime.engine_config import EngineConfig
from fxoffload.runtime.handles import handle_id, make_handle
from fxoffload.runtime.host_staging import HostStaging, PageableStaging, PinnedStaging, view_as
from fxoffload.runtime.locks import RuntimeLock
from fxoffload.runtime.slots import Slot
from fxoffload.runtime.staging import StagingPool
from fxoffload.runtime.transfers import Transfer

_entry_ids = itertools.count(1)


class EntryState(enum.Enum):
    """Where a stored tensor's bytes are. Its transitions, each under the engine lock:

    - WRITING -> FORWARDING: a ``wait`` came before the writes ended (``Engine.wait``);
    - WRITING or FORWARDING -> WRITTEN or FAILED: the last share settled
      (``Engine._finish_write``).

    A read (``_Entry.read``) is in flight only in WRITTEN or FAILED: it must not
    overtake the write of its slots.
    """

    WRITING = "writing"
    """Shares queued or running; the engine's staging copy holds every byte."""
    FORWARDING = "forwarding"
    """As WRITING, but a wait has the staging bytes (on the CPU the buffer itself, on CUDA
    a device copy made from it): the buffer is never pooled."""
    WRITTEN = "written"
    """Every share on disk (or cancelled, the handle having died first); no copy in memory."""
    FAILED = "failed"
    """Some shares could not be written: their bytes are kept in memory (``_Share.kept``),
    the others are on disk. ``wait`` restores them, or raises under ``on_io_error="raise"``."""


@dataclasses.dataclass(eq=False)
class _Share:
    """The bytes ``start`` to ``start + length`` of an entry, on one drive."""

    drive: Drive
    start: int
    length: int
    slot: Slot | None = None
    write: Transfer | None = None
    error: BaseException | None = None
    """Why the write failed, if it did."""
    kept: torch.Tensor | None = None
    """A failed share's bytes, kept in memory (uint8)."""
    checksums: list[int] = dataclasses.field(default_factory=list)
    """The checksum of each written chunk (``checksum.py``), when verifying."""


@dataclasses.dataclass(eq=False)
class _Entry:
    """One stored tensor: its layout, its shares, its state and the read in flight.

    Fields change under the engine lock. ``staging`` is the engine's copy:
    held while WRITING and FORWARDING (on the CPU a forwarding wait takes it),
    dropped or pooled once the writes settle.
    """

    id: int
    shape: tuple[int, ...]
    dim_order: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    nbytes: int
    host: HostStaging
    """How the bytes are staged in host memory and restored (by the device's kind)."""
    shares: list[_Share]
    staging: torch.Tensor | None
    """The engine's aligned copy (uint8)."""
    copied: torch.cuda.Event | None
    """Marks the copy into ``staging`` done, where it is queued (CUDA: on the caller's stream)."""
    state: EntryState = EntryState.WRITING
    reserved: bool = True
    """Its bytes still count in ``max_inflight_bytes``: given back once, by whichever of
    ``_finish_write`` and ``_forget`` comes first."""
    unsettled: int = 0
    """Shares whose write has not settled yet."""
    read: Transfer | None = None
    released: bool = False
    """The handle died: the slots are freed as soon as nothing is writing them."""


class Engine:
    """Stores tensors in one file per offload directory, each in a private directory.

    Args:
        roots: one existing, writable directory, or several, one per drive (the
            ``offload_dir`` option). Several drives on more than one file system
            share each tensor by their measured write rates (``probe.drive_rates``,
            cached); on one file system, equally.
        config: threads (per drive), chunk size, in-flight cap and I/O mode.
    """

    def __init__(self, roots: str | Sequence[str], config: EngineConfig | None = None) -> None:
        self.roots = (roots,) if isinstance(roots, str) else tuple(roots)
        self.config = config or EngineConfig()
        self.drives = open_drives(
            self.roots,
            io_mode=self.config.io_mode,
            io_threads=self.config.io_threads,
            chunk_bytes=self.config.chunk_bytes,
            verify=self.config.verify,
        )
        try:
            weights = probe.drive_weights(self.drives, self.config)
        except BaseException:
            for drive in self.drives:
                drive.close()
            raise
        self._striping = Striping(weights, self.config.chunk_bytes)
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
            with self._lock:  # split and registered at once: one lock on the hot path
                split = self._striping.split(nbytes)
                entry = _Entry(
                    id=next(_entry_ids),
                    shape=tuple(t.shape),
                    dim_order=order,
                    dtype=t.dtype,
                    device=t.device,
                    nbytes=nbytes,
                    host=host,
                    shares=[_Share(self.drives[s.drive], s.start, s.length) for s in split],
                    staging=buffer,
                    copied=copied,
                    unsettled=len(split),
                )
                self._entries[entry.id] = entry
            self._start_writes(entry, buffer, copied)
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
            if entry.state in (EntryState.WRITTEN, EntryState.FAILED) and entry.read is None:
                read = self._claim_read(entry)
        if read is not None:
            self._start_read(entry, read)

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        """Return the stored tensor, on its original device and with its layout.

        If the engine still holds the bytes (the writes have not finished),
        they are handed over ("forwarding", no read): on a GPU at once, as a
        device copy; on the CPU the staging buffer itself, once written. The
        slots stay valid either way, so a second ``wait`` on the same handle
        (``retain_graph=True``) reads them again.
        """
        entry = self._entry(handle)
        with self._lock:
            staging = entry.staging
            if staging is not None:  # only while WRITING or FORWARDING
                entry.state = EntryState.FORWARDING
                if not entry.host.copies_out:
                    entry.staging = None  # this waiter alone gets the engine's copy
        if staging is None:
            return entry.host.to_device(self._restored(entry), entry.device)

        def written() -> None:
            self._wait_writes(entry)
            self._check_failed(entry, restoring=False)  # this wait has every byte

        staged = view_as(staging, *self._layout(entry))
        out = entry.host.forward(staged, entry.copied, entry.device, written)
        stats.add("tensors_forwarded")
        return out

    def _restored(self, entry: _Entry) -> torch.Tensor:
        """The tensor of an entry whose staging copy is gone: read back, with any kept bytes."""
        self._wait_writes(entry)  # a read must never overtake the write of its slots
        self._check_failed(entry, restoring=True)
        started = None
        with self._lock:
            if entry.read is None:
                started = self._claim_read(entry)
            read = entry.read
            entry.read = None
        if started is not None:
            self._start_read(entry, started)
        assert read is not None
        error = read.wait()
        if error is not None:
            raise self._io_error("cannot read back", entry, error, self._read_drive(entry, error))
        assert read.buffer is not None
        if all(share.kept is not None for share in entry.shares):
            stats.add("tensors_forwarded")  # nothing was read: every byte was in memory
        return view_as(read.buffer, *self._layout(entry))

    def _wait_writes(self, entry: _Entry) -> None:
        for share in entry.shares:
            assert share.write is not None
            share.write.wait()

    def _check_failed(self, entry: _Entry, *, restoring: bool) -> None:
        """Raise for a settled ``entry`` whose write failed under ``on_io_error="raise"``, or,
        when ``restoring`` it from what the engine keeps, whose failed bytes could not be kept."""
        with self._lock:
            failed = [s for s in entry.shares if s.error is not None]
            lost = [s for s in failed if s.kept is None]
        if failed and self.config.on_io_error == "raise":
            share = failed[0]
            assert share.error is not None
            raise self._io_error("could not write", entry, share.error, share.drive)
        if lost and restoring:
            share = lost[0]
            raise self._io_error(
                "could not keep in memory the bytes it failed to write of",
                entry,
                share.error,
                share.drive,
            )

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

    @property
    def drive_weights(self) -> tuple[float, ...]:
        """Each drive's weight in splitting tensors over the drives (``Striping``)."""
        return self._striping.weights

    def owns(self, entry_id: int) -> bool:
        with self._lock:
            return entry_id in self._entries or entry_id in self._live_at_close

    def close(self) -> None:
        """Finish pending I/O and remove the private directories (idempotent).

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
        for drive in self.drives:
            drive.pool.shutdown(wait=True)
        self._staging.clear()
        for drive in self.drives:
            drive.close()

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
                f"fxoffload: handle #{entry_id} is not live in the engine for {self._where()}"
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

    def _forget(self, entry: _Entry | None, nbytes: int) -> None:
        """Undo a store that raised: its entry released as a dead handle's would be, and its
        reservation given back (if its writes did not already): one kept would have later
        stores wait for bytes that never land."""
        if entry is not None:
            self._release(entry.id)
        self._unreserve(entry, nbytes)

    def _unreserve(self, entry: _Entry | None, nbytes: int) -> None:
        with self._lock:
            if entry is not None:
                if not entry.reserved:
                    return
                entry.reserved = False
            self._inflight -= nbytes
            self._inflight_changed.notify_all()

    def _where(self) -> str:
        return repr(self.roots[0]) if len(self.roots) == 1 else repr(list(self.roots))

    def _closed_error(self) -> RuntimeError:
        return RuntimeError(f"fxoffload engine for {self._where()} is closed")

    def _io_error(self, what: str, entry: _Entry, err: BaseException, drive: Drive) -> RuntimeError:
        try:
            free = f"{drive.free_bytes()} bytes free"
        except OSError:  # removed by close
            free = "directory removed"
        return RuntimeError(
            f"fxoffload: {what} offloaded tensor #{entry.id} ({entry.nbytes} bytes, shape "
            f"{list(entry.shape)}, {entry.dtype}) in {drive.file.path} ({free} in "
            f"{drive.directory}): {err}"
        )

    # -- I/O ---------------------------------------------------------------------

    def _start_writes(self, entry: _Entry, buffer: torch.Tensor, copied) -> None:
        """Give each share a slot and queue its chunks; a share without room fails alone.

        Under ``on_io_error="raise"`` no room is an error at once, before any
        chunk is queued.
        """
        for share in entry.shares:
            try:
                share.slot = share.drive.file.allocate(share.length)
            except OSError as err:
                if self.config.on_io_error == "raise":
                    self._free_slots(entry)
                    raise self._io_error("no room for", entry, err, share.drive) from err
                share.error = err
        ready = copied.synchronize if copied is not None else None
        for i, share in enumerate(entry.shares):
            settled = self._share_settled(entry, share)
            if share.slot is None:
                share.write = Transfer(1, settled, buffer[share.start : share.start + share.length])
                share.write.chunk_done(share.error)
                continue
            end = share.start + share.slot.length
            share.checksums = [0] * share.drive.chunked.n_chunks(share.slot)
            share.write = Transfer(
                len(share.checksums), settled, buffer[share.start : end], drop_buffer=True
            )
            try:
                self._queue(
                    share.drive.chunked.write, share.write, share.slot, share.checksums, ready
                )
            except BaseException as err:
                for later in entry.shares[i + 1 :]:  # never to be queued: settle them too
                    view = buffer[later.start : later.start + later.length]
                    later.write = Transfer(1, self._share_settled(entry, later), view)
                    later.write.chunk_done(err)
                raise

    def _share_settled(
        self, entry: _Entry, share: _Share
    ) -> Callable[[BaseException | None], None]:
        """The callback of ``share``'s write: the last share to settle finishes the entry."""

        def settled(error: BaseException | None) -> None:
            with self._lock:
                share.error = error
                entry.unsettled -= 1
                last = entry.unsettled == 0
            if last:
                self._finish_write(entry)

        return settled

    def _finish_write(self, entry: _Entry) -> None:
        """The last share settled: WRITTEN, or FAILED with the failed shares' bytes kept."""
        failed = [share for share in entry.shares if share.error is not None]
        kept: dict[int, torch.Tensor] = {}
        try:
            if failed:
                kept = self._keep(entry, failed)
        except BaseException:  # no memory for the copy: those bytes are lost, as wait will say
            kept = {}
        with self._lock:
            for share in failed:
                assert share.write is not None
                share.kept, share.write.buffer = kept.get(id(share)), None
            forwarded = entry.state is EntryState.FORWARDING
            entry.state = EntryState.FAILED if failed else EntryState.WRITTEN
            released = entry.released
            staging, entry.staging = entry.staging, None
            if failed or forwarded or not entry.host.reusable(entry.copied):
                staging = None  # kept, or a wait (or a device copy) still has it
            warn = failed and not self._warned
            self._warned |= bool(failed)
        try:
            if staging is not None:
                self._staging.give(staging, pin_memory=entry.host.pinned)
                del staging  # freed now unless the pool kept it: before the bytes count as written
        finally:  # whatever the pool raises, later stores must not wait for these bytes
            self._unreserve(entry, entry.nbytes)
            if released:
                self._free_slots(entry)
        if failed:
            stats.add("io_errors")
            if warn:  # last: under -W error it raises, and nothing may be left undone
                share = failed[0]
                what = (
                    f"the tensor in memory instead ({entry.nbytes} bytes)"
                    if share.length == entry.nbytes
                    else f"{share.length} of the tensor's {entry.nbytes} bytes in memory instead"
                )
                warnings.warn(
                    f"fxoffload: writing to {share.drive.file.path} failed ({share.error}); "
                    f"keeping {what}. Gradients are unaffected; fxoffload.stats().io_errors "
                    "counts every such tensor.",
                    RuntimeWarning,
                    stacklevel=1,
                )

    def _keep(self, entry: _Entry, failed: list[_Share]) -> dict[int, torch.Tensor]:
        """Copies of the failed shares' bytes, by share id, to keep in memory (none once the
        handle died)."""
        if entry.copied is not None:
            entry.copied.synchronize()  # no chunk may have waited for the copy into staging
        with self._lock:
            released, whole = entry.released, None
            if not released and len(entry.shares) == 1:
                # The engine's own copy, if no wait has it, is kept as it is; taken from
                # the entry now, so that no wait ever owns the kept bytes.
                whole, entry.staging = entry.staging, None
        kept = {}
        for share in [] if released else failed:
            assert share.write is not None and share.write.buffer is not None
            view = share.write.buffer[: share.length]
            kept[id(share)] = view if whole is not None else view.clone()
        return kept

    def _claim_read(self, entry: _Entry) -> Transfer:
        """Make ``entry``'s read, for :meth:`_start_read` to start (the lock held).

        Its parts: each chunk on disk, and one for copying in the bytes kept in memory.
        """
        assert entry.state in (EntryState.WRITTEN, EntryState.FAILED)
        chunks = sum(s.drive.chunked.n_chunks(s.slot) for s in self._on_disk(entry))
        entry.read = Transfer(chunks + 1, lambda err: None)
        return entry.read

    def _start_read(self, entry: _Entry, read: Transfer) -> None:
        """Take a claimed read's buffer, copy in any kept bytes and queue the chunks on disk,
        without the engine lock: allocating faults pages in, which must not stall ``store``
        and the I/O threads."""
        on_disk = self._on_disk(entry)
        remaining = 1 + sum(s.drive.chunked.n_chunks(s.slot) for s in on_disk)
        try:
            read.buffer = entry.host.read_buffer(entry.nbytes)
            for share in entry.shares:
                if share.kept is not None:
                    read.buffer[share.start : share.start + share.length].copy_(share.kept)
            remaining -= 1
            read.chunk_done()
            for share in on_disk:
                remaining -= share.drive.chunked.n_chunks(share.slot)  # _queue settles these
                chunked = share.drive.chunked
                self._queue(chunked.read, read, share.start, share.slot, share.checksums)
        except BaseException as err:
            read.settle(remaining, err)
            raise

    @staticmethod
    def _on_disk(entry: _Entry) -> list[_Share]:
        return [s for s in entry.shares if s.error is None]

    def _read_drive(self, entry: _Entry, error: BaseException) -> Drive:
        """The drive a read error names: the one whose file it is about, else the first read."""
        drives = [s.drive for s in self._on_disk(entry)]
        path = getattr(error, "filename", None)
        named = [d for d in drives if d.file.path == path]
        return (named or drives or [entry.shares[0].drive])[0]

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
            read, entry.read = entry.read, None
            writing = entry.state in (EntryState.WRITING, EntryState.FORWARDING)
            if not writing:
                entry.staging = None
        if read is not None:
            read.cancel()
        if writing:
            for share in entry.shares:
                if share.write is not None:  # none: a store that raised before queueing any
                    share.write.cancel()  # the last chunk to settle frees the slots
        else:
            self._free_slots(entry)

    def _free_slots(self, entry: _Entry) -> None:
        for share in entry.shares:
            if share.slot is not None:
                share.drive.file.free(share.slot)
                share.slot = None
