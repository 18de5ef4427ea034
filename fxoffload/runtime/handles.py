"""Handles: small tensors that stand for an offloaded tensor.

A handle is one int64 (the entry's id) expanded, with zero strides, to shape
``(0, *shape)`` of the tensor it stands for: graphs with symbolic shapes still
see those sizes on it, while its zero element count tells inductor's memory
planning the truth, that a handle holds no memory (an activation-sized handle
made inductor's peak-memory reordering hoist every wait to the start of
backward). Its storage wraps a ctypes buffer that carries a
finaliser: when the last tensor or view using that storage dies (after
backward, or when autograd drops a graph without one) the finaliser releases
the entry. The handle's lifetime is therefore the saved tensor's lifetime,
whatever Python objects or views the compiled code made of it.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable, Sequence

import torch

from fxoffload.runtime.locks import when_unlocked


class _HandleCell(ctypes.c_int64 * 1):
    """The handle's storage; a ctypes subclass so that it can carry a finaliser."""


def make_handle(
    entry_id: int, shape: Sequence[int], on_free: Callable[[int], None]
) -> torch.Tensor:
    cell = _HandleCell(entry_id)
    weakref.finalize(cell, when_unlocked, on_free, entry_id)  # locks.py says why
    # frombuffer keeps `cell` alive for as long as the storage lives.
    scalar = torch.frombuffer(cell, dtype=torch.int64).reshape(())
    return scalar.expand((0, *shape))


def handle_id(handle: torch.Tensor) -> int:
    """The entry id a handle carries (read from storage, so empty shapes work too)."""
    if handle.dtype != torch.int64 or handle.device.type != "cpu":
        raise TypeError(f"not an fxoffload handle: {handle.dtype} tensor on {handle.device}")
    return int(handle.as_strided((), ()).item())
