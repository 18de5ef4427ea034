"""Inductor's lowerings of ``ssdtrain::store`` and ``ssdtrain::wait``.

``store``: its input is laid out as it would be as a saved value. Without
offloading, a saved value is a forward output, whose strides inductor fixes
to its traced ones when it lowers the node that makes it; an op inserted by
a pass gets no layout constraint (``needs_exact_strides`` applies only to
ops traced from user code). So the lowering asks for what being an output
asks for, at the same point in the graph: the kernels, and so the last bits,
stay those of ``policy="none"``.

``wait``: its output is marked aligned. Inductor takes a fallback's output to
be unaligned when any of its tensor inputs is, and every CPU graph input (our
handles) counts as unaligned, which would compile kernels reading a restored
activation without divisibility hints. ``wait`` returns a fresh allocation
or the front of a 4 KiB-aligned engine buffer, never a view at an offset.
"""

from __future__ import annotations

from fxoffload import ops
from fxoffload._compat import V, inductor_lowering
from fxoffload._compat import inductor_ir as ir

_store_fallback = inductor_lowering.fallback_handler(ops.store, add_to_fallback_set=False)
_wait_fallback = inductor_lowering.fallback_handler(ops.wait, add_to_fallback_set=False)


@inductor_lowering.register_lowering(ops.store, type_promotion_kind=None)
def _lower_store(x, offload_dir, dim_order):
    traced = V.graph.current_node.args[0].meta["val"]
    strides = traced.stride()
    # As inductor's GraphLowering.run_node does for an output that is not user visible.
    if traced._is_view() or isinstance(x.data, ir.BaseView):
        order = ir.get_stride_order(strides)
        x = ir.ExternKernel.require_stride_order(x, order, allow_padding=True)
    else:
        x = ir.ExternKernel.require_exact_strides(x, strides, allow_padding=True)
    return _store_fallback(x, offload_dir, dim_order)


@inductor_lowering.register_lowering(ops.wait, type_promotion_kind=None)
def _lower_wait(*args, **kwargs):
    restored = _wait_fallback(*args, **kwargs)
    V.graph.unaligned_buffers.discard(restored.get_name())
    return restored
