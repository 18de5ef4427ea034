"""The chunk checksum catches the changes a file can undergo under the engine."""

from __future__ import annotations

import random

import pytest

from fxoffload.runtime.checksum import BLOCK_BYTES, checksum

BLOCKS = 8


def chunk(extra: int = 0) -> bytearray:
    return bytearray(random.Random(0).randbytes(BLOCKS * BLOCK_BYTES + extra))


def of(data: bytearray) -> int:
    return checksum(memoryview(data))


def test_same_bytes_same_checksum_different_memory() -> None:
    assert of(chunk()) == of(chunk())


@pytest.mark.parametrize("position", [0, 7, 8, BLOCK_BYTES - 1, 5 * BLOCK_BYTES + 123, -1])
def test_one_flipped_bit_anywhere_is_caught(position: int) -> None:
    data = chunk()
    before = of(data)
    data[position] ^= 0x10
    assert of(data) != before


def test_blocks_swapped_moved_or_zeroed_are_caught() -> None:
    data = chunk()
    before = of(data)
    first, third = slice(0, BLOCK_BYTES), slice(2 * BLOCK_BYTES, 3 * BLOCK_BYTES)

    swapped = bytearray(data)
    swapped[first], swapped[third] = data[third], data[first]
    assert of(swapped) != before

    shifted = bytearray(BLOCK_BYTES) + data[:-BLOCK_BYTES]
    assert of(shifted) != before

    zeroed = bytearray(data)
    zeroed[third] = bytes(BLOCK_BYTES)
    assert of(zeroed) != before


def test_bytes_past_the_last_whole_block_count() -> None:
    data = chunk(extra=13)
    before = of(data)
    data[-13] ^= 1
    assert of(data) != before
    assert of(bytearray(b"abc")) != of(bytearray(b"abd"))
