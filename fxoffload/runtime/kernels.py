"""The real kernels of the ``ssdtrain::`` ops (defined in ``fxoffload.ops``): engine calls.

Registered for every backend: a handle is a CPU tensor whatever the device
of the tensor it stands for.
"""

from __future__ import annotations

import torch

from fxoffload.runtime import registry


@torch.library.impl("ssdtrain::store", "CompositeExplicitAutograd")
def _store(x: torch.Tensor, engine: str, dim_order: list[int]) -> torch.Tensor:
    """Copy ``x`` to the engine ``engine`` names, start its write, return a handle."""
    return registry.engine_named(engine).store(x, dim_order)


@torch.library.impl("ssdtrain::prefetch", "CompositeExplicitAutograd")
def _prefetch(handle: torch.Tensor) -> torch.Tensor:
    """Start reading the tensor back; returns the empty token that ``wait`` takes."""
    registry.engine_of(handle).prefetch(handle)
    return torch.empty(0)


@torch.library.impl("ssdtrain::wait", "CompositeExplicitAutograd")
def _wait(handle: torch.Tensor, token: torch.Tensor, dtype: torch.dtype, *layout) -> torch.Tensor:
    """Return the stored tensor (from memory if still there, else from its file).

    Its device and dim order (``layout``) are the engine's to restore; the fake
    implementation builds the same from them.
    """
    out = registry.engine_of(handle).wait(handle)
    if out.dtype != dtype or out.shape != handle.shape[1:]:
        raise RuntimeError(
            f"fxoffload: handle holds a {out.dtype} tensor of shape {list(out.shape)}, "
            f"but the graph expects {dtype} of shape {list(handle.shape[1:])}"
        )
    return out
