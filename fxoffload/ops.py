"""The ``ssdtrain::`` custom ops: the only bridge between graphs and runtime.

The passes insert these ops into the forward and backward graphs; at run
time they call the engine. Each has a fake implementation, so they trace,
and is declared side-effectful, so no dead-code elimination removes them.

In the forward graph::

    handle = ssdtrain.store(x, offload_dir, dim_order)

In the backward graph::

    token = ssdtrain.prefetch(handle)          # placed early: starts the read
    x = ssdtrain.wait(handle, token, dtype, device, dim_order)

A handle is a CPU int64 tensor of shape ``(0, *x.shape)`` (see
``runtime/handles.py``): symbolic sizes stay visible in the backward graph and
it holds no memory as far as any memory planner can tell.
``dim_order`` (outermost dimension first) fixes the layout of what ``wait``
returns: the fake and the real implementation build it the same way, which is
what inductor's output-stride checks rely on. ``store`` carries the
``needs_exact_strides`` tag, but inductor applies the tag only to ops traced
from user code; for ours, ``fxoffload/lowering.py`` lays ``x`` out as it would
be without offloading.
"""

from __future__ import annotations

import torch
from torch.fx import has_side_effect

from fxoffload.runtime import registry


@torch.library.custom_op("ssdtrain::store", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def _store(x: torch.Tensor, offload_dir: str, dim_order: list[int]) -> torch.Tensor:
    """Copy ``x`` to the engine of ``offload_dir``, start its write, return a handle."""
    return registry.engine_for(offload_dir).store(x, dim_order)


@_store.register_fake
def _store_fake(x: torch.Tensor, offload_dir: str, dim_order: list[int]) -> torch.Tensor:
    return torch.empty((), dtype=torch.int64, device="cpu").expand((0, *x.shape))


@torch.library.custom_op("ssdtrain::prefetch", mutates_args=())
def _prefetch(handle: torch.Tensor) -> torch.Tensor:
    """Start reading the tensor back; returns an empty token that ``wait`` takes.

    The token is a data dependency, so every compiler keeps the prefetch and
    keeps it before its wait.
    """
    registry.engine_of(handle).prefetch(handle)
    return torch.empty(0)


@_prefetch.register_fake
def _prefetch_fake(handle: torch.Tensor) -> torch.Tensor:
    return torch.empty(0)


@torch.library.custom_op("ssdtrain::wait", mutates_args=())
def _wait(
    handle: torch.Tensor,
    token: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    dim_order: list[int],
) -> torch.Tensor:
    """Return the stored tensor (from memory if still there, else from its file)."""
    out = registry.engine_of(handle).wait(handle)
    if out.dtype != dtype or out.shape != handle.shape[1:]:
        raise RuntimeError(
            f"fxoffload: handle holds a {out.dtype} tensor of shape {list(out.shape)}, "
            f"but the graph expects {dtype} of shape {list(handle.shape[1:])}"
        )
    return out


@_wait.register_fake
def _wait_fake(
    handle: torch.Tensor,
    token: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    dim_order: list[int],
) -> torch.Tensor:
    return torch.empty_permuted(handle.shape[1:], dim_order, dtype=dtype, device=device)


store = torch.ops.ssdtrain.store.default
prefetch = torch.ops.ssdtrain.prefetch.default
wait = torch.ops.ssdtrain.wait.default

for _op in (store, prefetch, wait):
    has_side_effect(_op)
