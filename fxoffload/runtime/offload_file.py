"""The engine's one offload file: slots, direct I/O when possible, positional reads and writes.

Direct I/O (``O_DIRECT``) bypasses the page cache, so the bytes really reach the
disk and memory is not spent caching what was offloaded to free memory. It
needs buffer addresses, file offsets and lengths aligned to the device's
block size; every slot and buffer here is aligned to ``ALIGNMENT``. File
systems that refuse it (tmpfs, some FUSE) get buffered I/O instead, found by
a probe when the file is opened.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os

import torch

from fxoffload.runtime.locks import RuntimeLock
from fxoffload.runtime.slots import Slot, SlotAllocator

ALIGNMENT = 4096
"""Alignment of buffers, offsets and lengths; 4 KiB suits every NVMe logical block size."""

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_OPEN = os.O_RDWR | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


HUGE_PAGE = 2 << 20
"""Buffers of at least this size ask for transparent huge pages (x86-64 and arm64's 2 MiB)."""


def aligned_buffer(
    nbytes: int, *, pin_memory: bool = False, populate: bool = False
) -> torch.Tensor:
    """A 1-D uint8 CPU tensor of ``nbytes`` rounded up to ``ALIGNMENT``, on an aligned address.

    Unpinned buffers come from an anonymous ``mmap`` (page-aligned, storage
    offset 0, returned to the OS when the tensor dies): a tensor handed to
    compiled code must start at its storage's start, since inductor addresses
    buffers relative to it. Pinned buffers (for CUDA, never handed out: their
    device copy is) come from the caching host allocator.

    Unpinned buffers of ``HUGE_PAGE`` bytes and more ask for transparent huge
    pages (``MADV_HUGEPAGE``; many distributions give them only to memory
    that asks): a fresh page costs a fault and a zeroing, and one 2 MiB fault
    replaces 512 of 4 KiB. Where the kernel has none to give, it falls back
    to small pages.

    ``populate`` faults every page in at once, for a buffer the calling
    thread fills next, which is faster than faulting them in one by one
    during that copy. A buffer the I/O threads read into is better left to
    fault in there, in parallel.
    """
    padded = -(-max(nbytes, 1) // ALIGNMENT) * ALIGNMENT
    if not pin_memory:
        memory = mmap.mmap(-1, padded, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if padded >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):  # EINVAL: a kernel built without THP
                memory.madvise(mmap.MADV_HUGEPAGE)
        buffer = torch.frombuffer(memory, dtype=torch.uint8)
        if populate:
            buffer[:: mmap.PAGESIZE].fill_(0)  # a write per page (fresh pages are zero)
        return buffer
    raw = torch.empty(padded, dtype=torch.uint8, pin_memory=True)
    if raw.data_ptr() % ALIGNMENT == 0:  # cudaHostAlloc's blocks are page-aligned
        return raw
    # The caching host allocator rounds sizes up to a power of two, so slack for
    # alignment is asked for only when needed: it would double a 4 MiB buffer.
    raw = torch.empty(padded + ALIGNMENT, dtype=torch.uint8, pin_memory=True)
    start = -raw.data_ptr() % ALIGNMENT
    return raw[start : start + padded]


def as_memoryview(buf: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous uint8 CPU tensor, without a copy."""
    array = (ctypes.c_char * buf.numel()).from_address(buf.data_ptr())
    return memoryview(array).cast("B")


class OffloadFile:
    """A file in ``directory`` whose byte ranges (slots) hold stored tensors.

    Space is reserved with ``posix_fallocate`` as the file grows, so a full
    disk shows up as an error from :meth:`allocate`, before any byte is
    written, rather than as a short write later.

    Args:
        directory: the engine's private directory.
        direct: force direct I/O on (``True``) or off (``False``); ``None``
            probes the file system.
        name: the file's name in ``directory``.
    """

    def __init__(
        self, directory: str, direct: bool | None = None, name: str = "offload.bin"
    ) -> None:
        self.path = os.path.join(directory, name)
        self._fd = os.open(self.path, _OPEN | os.O_CREAT | os.O_EXCL, 0o600)
        self.direct = False
        if direct is not False and _O_DIRECT:
            try:
                self._try_direct(required=direct is True)
            except OSError:
                self.close()
                raise
        self._allocator = SlotAllocator(ALIGNMENT)
        self._lock = RuntimeLock()
        self._size = 0

    def _try_direct(self, *, required: bool) -> None:
        try:
            fd = os.open(self.path, _OPEN | _O_DIRECT)
        except OSError as e:
            if required or e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            return
        probe = aligned_buffer(ALIGNMENT)
        try:
            os.ftruncate(fd, ALIGNMENT)
            os.pwrite(fd, as_memoryview(probe), 0)
        except OSError as e:
            os.close(fd)
            if required or e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            return
        os.ftruncate(fd, 0)
        os.close(self._fd)
        self._fd = fd
        self.direct = True

    @property
    def size(self) -> int:
        """Bytes the file occupies (its high-water mark: freed slots are reused, not returned)."""
        return self._size

    @property
    def bytes_in_use(self) -> int:
        with self._lock:
            return self._allocator.in_use

    def allocate(self, nbytes: int) -> Slot:
        """Reserve an aligned slot; grows (and fallocates) the file when needed.

        A growth the disk refuses is undone, so the slots the file already has
        stay usable without asking the disk for that growth again.
        """
        with self._lock:
            slot = self._allocator.allocate(nbytes)
            if self._allocator.capacity > self._size:
                try:
                    os.posix_fallocate(self._fd, self._size, self._allocator.capacity - self._size)
                except OSError:
                    self._allocator.free(slot)
                    self._allocator.shrink(self._size)
                    raise
                self._size = self._allocator.capacity
            return slot

    def free(self, slot: Slot) -> None:
        with self._lock:
            self._allocator.free(slot)

    def write(self, buf: memoryview, offset: int) -> None:
        """Write all of ``buf`` at ``offset`` (both aligned when direct)."""
        done = 0
        while done < len(buf):
            done += os.pwrite(self._fd, buf[done:], offset + done)

    def read(self, buf: memoryview, offset: int) -> None:
        """Fill all of ``buf`` from ``offset``."""
        done = 0
        while done < len(buf):
            got = os.preadv(self._fd, [buf[done:]], offset + done)
            if got == 0:
                raise OSError(errno.EIO, f"offload file ended at byte {offset + done}", self.path)
            done += got

    def sync(self) -> None:
        """Flush written bytes to the device (buffered I/O leaves them in the page cache)."""
        os.fsync(self._fd)

    def drop_cache(self) -> None:
        """Evict the file's synced pages from the page cache, so later reads go to the device."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        os.close(self._fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
