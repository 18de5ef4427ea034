"""The ``ssdtrain::`` custom ops: schemas and fake implementations, the seam of graphs and runtime.

The passes insert these ops into the forward and backward graphs; the
runtime registers their real kernels (``fxoffload/runtime/kernels.py``), so
this module, and the passes with it, import without the runtime. Each op has
a fake implementation, so it traces, and is declared side-effectful, so no
dead-code elimination removes it.

In the forward graph::

    handle = ssdtrain.store(x, engine, dim_order)

In the backward graph::

    token = ssdtrain.prefetch(handle)          # placed early: starts the read
    x = ssdtrain.wait(handle, token, dtype, device, dim_order)

``engine`` names the engine that holds ``x``: its offload directory and I/O
settings (:func:`engine_key`), so a compiled graph finds the engine it was
compiled for, and graphs compiled with other settings get their own.
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

import json
from collections.abc import Mapping

import torch
from torch.fx import has_side_effect

torch.library.define(
    "ssdtrain::store",
    "(Tensor x, str engine, SymInt[] dim_order) -> Tensor",
    tags=(torch.Tag.pt2_compliant_tag, torch.Tag.needs_exact_strides),
)
torch.library.define(
    "ssdtrain::prefetch", "(Tensor handle) -> Tensor", tags=(torch.Tag.pt2_compliant_tag,)
)
torch.library.define(
    "ssdtrain::wait",
    "(Tensor handle, Tensor token, ScalarType dtype, Device device, SymInt[] dim_order) -> Tensor",
    tags=(torch.Tag.pt2_compliant_tag,),
)


@torch.library.register_fake("ssdtrain::store")
def _store_fake(x: torch.Tensor, engine: str, dim_order: list[int]) -> torch.Tensor:
    return torch.empty((), dtype=torch.int64, device="cpu").expand((0, *x.shape))


@torch.library.register_fake("ssdtrain::prefetch")
def _prefetch_fake(handle: torch.Tensor) -> torch.Tensor:
    """The token: an empty tensor whose data dependency keeps the prefetch before its wait."""
    return torch.empty(0)


@torch.library.register_fake("ssdtrain::wait")
def _wait_fake(
    handle: torch.Tensor,
    token: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    dim_order: list[int],
) -> torch.Tensor:
    return torch.empty_permuted(handle.shape[1:], dim_order, dtype=dtype, device=device)


def engine_key(offload_dir: str | tuple[str, ...], io_settings: Mapping[str, object]) -> str:
    """``store``'s ``engine`` argument: the directory (or directories) and the I/O settings,
    as one JSON object."""
    return json.dumps({"offload_dir": offload_dir, **io_settings})


def parse_engine_key(key: str) -> tuple[str | tuple[str, ...], dict[str, object]]:
    """The directory (or directories) and I/O settings that :func:`engine_key` wrote."""
    settings = json.loads(key)
    offload_dir = settings.pop("offload_dir")
    return offload_dir if isinstance(offload_dir, str) else tuple(offload_dir), settings


store = torch.ops.ssdtrain.store.default
prefetch = torch.ops.ssdtrain.prefetch.default
wait = torch.ops.ssdtrain.wait.default

for _op in (store, prefetch, wait):
    has_side_effect(_op)
