"""Staging and read buffers kept for reuse, up to a byte cap.

Fresh memory is slow: every page faults in on first touch, and the kernel's
work for it competes with training for the CPU. A step stores and reads the
same sizes as the step before, so buffers are recycled: a staging buffer once
its write has finished, a read buffer once the restored tensor made from it
dies (compiled backward frees it).

The cap (``staging_pool_bytes``) bounds the memory this holds while idle;
buffers given back beyond it are freed. Buffers are matched by exact padded
size.
"""

from __future__ import annotations

import ctypes
import weakref

import torch

from fxoffload.runtime import stats
from fxoffload.runtime.locks import RuntimeLock, when_unlocked
from fxoffload.runtime.offload_file import ALIGNMENT, aligned_buffer


class StagingPool:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = {}
        self._held = 0
        self._lock = RuntimeLock()

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._held

    def take(self, nbytes: int, *, pin_memory: bool, populate: bool = True) -> torch.Tensor:
        """A buffer of ``nbytes`` rounded up to ``ALIGNMENT``: a kept one if any, else new.

        A new one is faulted in at once (``populate``, see ``aligned_buffer``)
        unless the caller says the I/O threads fill it.
        """
        key = (_padded(nbytes), pin_memory)
        with self._lock:
            free = self._free.get(key)
            if free:
                self._held -= key[0]
                stats.add("staging_reused")
                return free.pop()
        return aligned_buffer(nbytes, pin_memory=pin_memory, populate=populate)

    def give(self, buffer: torch.Tensor, *, pin_memory: bool) -> None:
        """Keep ``buffer`` (from :meth:`take`, no longer used by anyone) if it fits the cap."""
        size = buffer.numel()
        with self._lock:
            if self._held + size <= self.capacity:
                self._free.setdefault((size, pin_memory), []).append(buffer)
                self._held += size

    def take_returning(self, nbytes: int) -> torch.Tensor:
        """A CPU buffer like :meth:`take`, given back by itself once every tensor on it dies.

        For read buffers, which become restored tensors that compiled code
        frees whenever it is done with them.
        """
        buffer = self.take(nbytes, pin_memory=False, populate=False)  # the I/O threads fill it
        # The tensor holds ``array``; the finalizer holds ``buffer``, the memory's
        # owner, until ``array`` dies with the last tensor, then pools it.
        array = (ctypes.c_char * buffer.numel()).from_address(buffer.data_ptr())
        weakref.finalize(array, when_unlocked, self.give, buffer, pin_memory=False).atexit = False
        return torch.frombuffer(array, dtype=torch.uint8)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._held = 0


def _padded(nbytes: int) -> int:
    return -(-max(nbytes, 1) // ALIGNMENT) * ALIGNMENT
