"""Chunk checksums: how ``wait`` tells a changed offload file from the bytes it wrote.

The checksum runs on an I/O thread for every byte written and read, and on a
machine without cores to spare its CPU time is taken from training, so the
per-byte work is a vectorised torch reduction rather than CRC-32 over every
byte: the 64-bit XOR of the words of each 4 KiB block (``hash_tensor``), then
CRC-32 over those block digests, 1/512 of the bytes, so that the order of the
blocks counts.

What it catches: a block overwritten, zeroed, lost or moved (the faults of a
file changed under us, which come in whole blocks), and any change confined
to one block except one whose XOR is zero, such as the same bit flipped in
two of its words or two of its words swapped. Past the per-block digests,
two different chunks collide with CRC-32's odds, 2**-32.
"""

from __future__ import annotations

import zlib

import torch

from fxoffload.runtime.offload_file import as_memoryview

BLOCK_BYTES = 4096


def checksum(chunk: memoryview) -> int:
    """The checksum of a chunk of bytes (any length; I/O chunks are whole blocks)."""
    whole = len(chunk) - len(chunk) % BLOCK_BYTES
    crc = 0
    if whole:
        words = torch.frombuffer(chunk, dtype=torch.int64, count=whole // 8)
        digests = torch.hash_tensor(words.view(-1, BLOCK_BYTES // 8), dim=1)
        crc = zlib.crc32(as_memoryview(digests.view(torch.uint8)))
    return zlib.crc32(chunk[whole:], crc)
