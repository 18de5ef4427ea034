"""Inductor's lowering of ``ssdtrain::wait``: what it returns is aligned.

Inductor runs our ops as fallbacks (opaque calls), and it takes a fallback's
output to be unaligned when any of its tensor inputs is. Every CPU graph input
counts as unaligned, so the CPU handle made every restored activation
"unaligned": Triton kernels reading one were compiled without divisibility
hints, with narrower loads and reductions that sum in another order. On an
H200 that made gradients differ from ``policy="none"`` in the last bits
(a two-block attention model, float32 and bfloat16 autocast alike).

What ``wait`` returns always starts its own allocation: a fresh device copy,
or the front of an engine buffer (4 KiB-aligned), never a view at an offset.
So this lowering is inductor's own fallback, minus the unaligned mark.
"""

from __future__ import annotations

from torch._inductor import lowering
from torch._inductor.virtualized import V

from fxoffload import ops

_fallback = lowering.fallback_handler(ops.wait, add_to_fallback_set=False)


@lowering.register_lowering(ops.wait, type_promotion_kind=None)
def _lower_wait(*args, **kwargs):
    restored = _fallback(*args, **kwargs)
    V.graph.unaligned_buffers.discard(restored.get_name())
    return restored
