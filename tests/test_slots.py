"""The slot allocator: aligned, reused, coalesced, grown only when full."""

from __future__ import annotations

import itertools
import random

import pytest

from fxoffload.runtime.offload_file import OffloadFile
from fxoffload.runtime.slots import SlotAllocator


def test_slots_are_aligned_and_disjoint() -> None:
    alloc = SlotAllocator(alignment=4096)
    slots = [alloc.allocate(n) for n in (1, 4096, 4097, 0, 100_000)]
    assert all(s.offset % 4096 == 0 and s.length % 4096 == 0 for s in slots)
    assert [s.length for s in slots] == [4096, 4096, 8192, 4096, 102400]
    ends = sorted((s.offset, s.offset + s.length) for s in slots)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(ends))
    assert alloc.capacity >= ends[-1][1]


def test_freed_slots_coalesce_and_are_reused_without_growth() -> None:
    alloc = SlotAllocator(alignment=4096)
    a, b, c = (alloc.allocate(8192) for _ in range(3))
    capacity = alloc.capacity
    for s in (a, c, b):  # free out of order: three ranges must merge into one
        alloc.free(s)
    assert alloc.in_use == 0
    big = alloc.allocate(3 * 8192)
    assert big.offset == 0 and alloc.capacity == capacity


def test_a_training_loop_stops_growing_after_its_first_step() -> None:
    rng = random.Random(0)
    sizes = [rng.randrange(1, 5 << 20) for _ in range(12)]
    alloc = SlotAllocator()
    capacities = []
    for _ in range(200):
        held = [alloc.allocate(n) for n in sizes]  # forward stores
        for s in reversed(held):  # backward frees, last first
            alloc.free(s)
        capacities.append(alloc.capacity)
    assert alloc.in_use == 0
    assert len(set(capacities)) == 1


def test_random_allocate_free_never_overlaps() -> None:
    rng = random.Random(1)
    alloc = SlotAllocator(alignment=512)
    live = []
    for _ in range(2000):
        if live and rng.random() < 0.5:
            alloc.free(live.pop(rng.randrange(len(live))))
        else:
            live.append(alloc.allocate(rng.randrange(0, 50_000)))
        spans = sorted((s.offset, s.offset + s.length) for s in live)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
        assert alloc.in_use == sum(s.length for s in live)


def test_alignment_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        SlotAllocator(alignment=3000)


def test_a_growth_the_disk_refused_is_undone(tiny_tmpfs) -> None:
    """A failed ``posix_fallocate`` leaves the file as it was, its slots still usable.

    Kept grown, the allocator would make every later allocation, even one
    that fits in the file, ask the full disk for the whole growth again.
    """
    file = OffloadFile(str(tiny_tmpfs), direct=False)
    try:
        slots = []
        with pytest.raises(OSError):
            while True:  # the file doubles until the disk is full
                slots.append(file.allocate(4096))
        size = file.size
        file.free(slots.pop(0))
        slot = file.allocate(4096)  # fits in the file as it is
        assert slot.offset + slot.length <= size == file.size
    finally:
        file.close()
