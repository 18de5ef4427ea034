"""Chunked transfers: a slot of an offload file moved in chunks over its drive's I/O threads.

Each tensor is split into ``chunk_bytes`` chunks, written and read by several
threads at positional offsets of the file; with ``verify``, each chunk's
checksum (``checksum.py``) is taken as it is written and checked as it is
read, so a file changed under us is an error, never wrong bytes.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from fxoffload.runtime import stats
from fxoffload.runtime.checksum import checksum
from fxoffload.runtime.offload_file import OffloadFile, as_memoryview
from fxoffload.runtime.slots import Slot


class Transfer:
    """The chunk jobs of one write or read; ``on_done`` runs once, after the last.

    It holds ``buffer``, the memory its chunks read from or write into: their
    views are raw addresses that keep nothing alive, and every queued or
    running chunk holds the transfer, so the buffer outlives the last chunk
    even when its entry is released mid-transfer. A write lets go of it after
    the last chunk (``drop_buffer``): the entry keeps its transfer until the
    handle dies, and holding the staging copy that long would undo the very
    memory saving offloading is for. A failed write and a read keep it: the
    failed bytes stay in memory, and a read's buffer is what ``wait`` returns.
    """

    def __init__(
        self,
        n_chunks: int,
        on_done: Callable[[BaseException | None], None],
        buffer: torch.Tensor | None = None,
        *,
        drop_buffer: bool = False,
    ) -> None:
        self.buffer = buffer
        self._drop_buffer = drop_buffer
        self._remaining = n_chunks
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._on_done = on_done
        self.futures: list[Future[None]] = []

    def chunk_done(self, error: BaseException | None = None) -> None:
        with self._lock:
            self._remaining -= 1
            if error is not None and self._error is None:
                # Kept without its traceback: the frames it holds reach back into
                # the compiled graph's locals, whose handles would never be freed.
                self._error = error.with_traceback(None)
            last = self._remaining == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        if self._drop_buffer and self._error is None:
            self.buffer = None
        # Dropped once called: it refers to the entry that holds this transfer,
        # and without that cycle an entry dies with its handle, not at a collection.
        on_done, self._on_done = self._on_done, None
        try:
            on_done(self._error)
        finally:
            self._done.set()

    def settle(self, n_chunks: int, error: BaseException) -> None:
        """Count ``n_chunks`` chunks that will never be queued as done, with ``error``."""
        for _ in range(n_chunks):
            self.chunk_done(error)

    def cancel(self) -> None:
        """Cancel the chunks not started yet (each counts as done)."""
        for f in self.futures:
            if f.cancel():
                self.chunk_done()

    def wait(self) -> BaseException | None:
        """Block until the last chunk settled; time spent blocked counts as a stall in stats."""
        if not self._done.is_set():
            started = time.perf_counter_ns()
            self._done.wait()
            stats.add("wait_stalls")
            stats.add("wait_stall_ns", time.perf_counter_ns() - started)
        return self._error


class ChunkedFile:
    """Moves slots of ``file`` in ``chunk_bytes`` chunks on ``pool``'s threads.

    A chunk that cannot be queued (the pool shut down) settles its transfer
    with the error, so nobody waits for it forever; the error is raised too.
    Bytes moved are counted for ``root``, the offload directory of ``file``.
    """

    def __init__(
        self,
        file: OffloadFile,
        pool: ThreadPoolExecutor,
        chunk_bytes: int,
        *,
        verify: bool,
        root: str,
    ) -> None:
        self.file = file
        self._pool = pool
        self._chunk_bytes = chunk_bytes
        self._verify = verify
        self._root = root

    def n_chunks(self, slot: Slot) -> int:
        return -(-slot.length // self._chunk_bytes)

    def write(
        self,
        transfer: Transfer,
        slot: Slot,
        checksums: list[int],
        ready: Callable[[], object] | None = None,
    ) -> None:
        """Write ``transfer.buffer`` to ``slot``, each chunk once ``ready()`` returns;
        ``checksums`` gets each chunk's checksum."""
        self._submit(transfer, 0, slot, self._write_chunk, checksums, ready)

    def read(self, transfer: Transfer, at: int, slot: Slot, checksums: list[int]) -> None:
        """Read ``slot`` into ``transfer.buffer`` from byte ``at`` (a multiple of 4096) on,
        each chunk checked against ``checksums``."""
        self._submit(transfer, at, slot, self._read_chunk, checksums)

    def _submit(self, transfer: Transfer, at: int, slot: Slot, job, *extra) -> None:
        assert transfer.buffer is not None
        data = as_memoryview(transfer.buffer)[at : at + slot.length]
        starts = range(0, slot.length, self._chunk_bytes)
        for i, start in enumerate(starts):
            view = data[start : start + self._chunk_bytes]
            try:
                future = self._pool.submit(job, transfer, i, view, slot.offset + start, *extra)
            except BaseException as err:
                transfer.settle(len(starts) - i, err)
                raise
            transfer.futures.append(future)

    def _write_chunk(
        self,
        transfer: Transfer,
        i: int,
        view: memoryview,
        offset: int,
        checksums: list[int],
        ready: Callable[[], object] | None,
    ) -> None:
        try:
            if ready is not None:
                ready()
            started = time.thread_time_ns()
            self.file.write(view, offset)
            if self._verify:
                checksums[i] = checksum(view)
            stats.add("io_cpu_ns", time.thread_time_ns() - started)
        except BaseException as err:  # reported through the transfer
            transfer.chunk_done(err)
            return
        stats.add_for(self._root, "bytes_written", len(view))
        transfer.chunk_done()

    def _read_chunk(
        self, transfer: Transfer, i: int, view: memoryview, offset: int, checksums: list[int]
    ) -> None:
        try:
            started = time.thread_time_ns()
            self.file.read(view, offset)
            matches = not self._verify or checksum(view) == checksums[i]
            stats.add("io_cpu_ns", time.thread_time_ns() - started)
            if not matches:
                raise OSError(
                    errno.EIO,
                    f"bytes {offset}-{offset + len(view)} differ from what was written "
                    "(checksum mismatch): the file was changed",
                    self.file.path,
                )
        except BaseException as err:
            transfer.chunk_done(err)
            return
        stats.add_for(self._root, "bytes_read", len(view))
        transfer.chunk_done()
