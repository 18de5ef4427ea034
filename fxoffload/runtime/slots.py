"""Byte ranges of the engine's one offload file: allocate, free, reuse, grow.

One preallocated file with a slot allocator, rather than a file per tensor,
means no create/unlink per tensor (file-system churn costs more than the
write for small tensors) and offsets aligned for direct I/O.
"""

from __future__ import annotations

import bisect
import dataclasses


@dataclasses.dataclass(frozen=True)
class Slot:
    offset: int
    length: int


class SlotAllocator:
    """First-fit allocator over ``[0, capacity)`` with coalescing of free ranges.

    Every offset and length is a multiple of ``alignment``. When no free range
    fits, the capacity grows (at least doubling) and the caller extends the
    file; freed slots are reused, so a training loop that stores the same
    sizes every step stops growing after its first step.
    """

    def __init__(self, alignment: int = 4096, capacity: int = 0) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.alignment = alignment
        self.capacity = self.round_up(capacity)
        self._free_offsets: list[int] = []  # sorted starts of free ranges
        self._free_length: dict[int, int] = {}
        if self.capacity:
            self._add_free(0, self.capacity)
        self.in_use = 0

    def round_up(self, n: int) -> int:
        return -(-n // self.alignment) * self.alignment

    def allocate(self, nbytes: int) -> Slot:
        """A slot of at least ``nbytes`` (one alignment unit for an empty tensor)."""
        length = self.round_up(max(nbytes, 1))
        for offset in self._free_offsets:
            if self._free_length[offset] >= length:
                break
        else:
            offset = self._grow(length)
        rest = self._free_length[offset] - length
        self._remove_free(offset)
        if rest:
            self._add_free(offset + length, rest)
        self.in_use += length
        return Slot(offset, length)

    def free(self, slot: Slot) -> None:
        self.in_use -= slot.length
        start, end = slot.offset, slot.offset + slot.length
        i = bisect.bisect_left(self._free_offsets, start)
        if i < len(self._free_offsets) and self._free_offsets[i] == end:
            nxt = self._free_offsets[i]
            end += self._free_length[nxt]
            self._remove_free(nxt)
        if i > 0:
            prev = self._free_offsets[i - 1]
            if prev + self._free_length[prev] == start:
                start = prev
                self._remove_free(prev)
        self._add_free(start, end - start)

    def shrink(self, capacity: int) -> None:
        """Undo growth back to ``capacity``: the range beyond it must be free (a growth the
        file could not follow)."""
        if capacity >= self.capacity:
            return
        tail = self._free_offsets[-1]
        assert tail <= capacity and tail + self._free_length[tail] == self.capacity
        self._remove_free(tail)
        if tail < capacity:
            self._add_free(tail, capacity - tail)
        self.capacity = capacity

    def _grow(self, length: int) -> int:
        """Extend capacity so a free range of ``length`` ends the file; return its start."""
        old = self.capacity
        tail = self._free_offsets[-1] if self._free_offsets else None
        tail_free = (
            self._free_length[tail]
            if tail is not None and tail + self._free_length[tail] == old
            else 0
        )
        self.capacity = self.round_up(max(old * 2, old - tail_free + length))
        start = old - tail_free
        if tail_free:
            self._remove_free(start)
        self._add_free(start, self.capacity - start)
        return start

    def _add_free(self, offset: int, length: int) -> None:
        bisect.insort(self._free_offsets, offset)
        self._free_length[offset] = length

    def _remove_free(self, offset: int) -> None:
        self._free_offsets.pop(bisect.bisect_left(self._free_offsets, offset))
        del self._free_length[offset]
