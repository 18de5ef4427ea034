"""A cost model of the graphs: how long each node computes and each transfer takes.

Coarse on purpose. A node's time is its FLOPs at the device's measured FLOP
rate plus the bytes it reads and writes at the device's memory bandwidth
(the roofline's two sides added, since which one binds is unknown without
running it). The FLOP rate is the node's dtype's: 16-bit matmuls (autocast)
run several times faster than float32 ones on accelerators. FLOPs come from
``torch.utils.flop_counter``'s formulas (matmuls, convolutions, attention);
other ops count as memory-bound. Sizes are shape hints, so dynamic shapes
plan for the example sizes and add no guard. With ``cost_model="profile"``
a node's measured time (``profiling.py``) replaces the model's. The planner
only compares these times with transfer times, so a uniform error in either
shifts decisions, it does not break them; the ``io_safety`` factor covers the
rest.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry

from fxoffload import ops
from fxoffload._compat import size_hint
from fxoffload.passes.saved import is_view, tensor_nbytes


@dataclasses.dataclass(frozen=True)
class DeviceCosts:
    """The rates the model runs on: measured by the runtime or given as options."""

    flops_per_s: float
    memory_bytes_per_s: float
    write_bytes_per_s: float
    read_bytes_per_s: float
    flops_per_s_16bit: float | None = None
    """The rate of bfloat16 and float16 ops (autocast's matmuls); ``None``: ``flops_per_s``."""
    copy_bytes_per_s: float | None = None
    """How fast ``store`` copies a tensor into host staging, on the compute stream or
    thread: step time it pays. ``None``: half of ``memory_bytes_per_s`` (read and write)."""
    io_compute_seconds_per_byte: float = 0.0
    """Compute time the I/O takes per byte written or read, where the device's cores are
    the ones that compute (a CPU device): measured as the slowdown of compute beside
    the I/O threads. 0 on an accelerator, and where the disk was not measured."""

    def copy_time(self, nbytes: int) -> float:
        rate = self.copy_bytes_per_s or self.memory_bytes_per_s / 2
        return nbytes / rate

    def offload_overhead(self, nbytes: int) -> float:
        """Step time one store of ``nbytes`` costs: its staging copy, and the compute its
        write and read take."""
        return self.copy_time(nbytes) + 2 * nbytes * self.io_compute_seconds_per_byte

    def flop_rate(self, dtype: torch.dtype | None) -> float:
        if self.flops_per_s_16bit is not None and dtype in (torch.bfloat16, torch.float16):
            return self.flops_per_s_16bit
        return self.flops_per_s

    def write_time(self, nbytes: int) -> float:
        return nbytes / self.write_bytes_per_s

    def read_time(self, nbytes: int) -> float:
        return nbytes / self.read_bytes_per_s


_FREE_OPS = (ops.store, ops.prefetch, ops.wait, operator.getitem)

MEASURED_SECONDS = "fxoffload_measured_seconds"
"""``node.meta`` key of a node's measured time (``cost_model="profile"``, ``profiling.py``)."""


def node_time(node: fx.Node, costs: DeviceCosts) -> float:
    """Seconds to run ``node``: measured if profiled, else modelled.

    Placeholders, outputs, views and our own ops cost nothing.
    """
    if node.op != "call_function" or node.target in _FREE_OPS or is_view(node):
        return 0.0
    if MEASURED_SECONDS in node.meta:
        return node.meta[MEASURED_SECONDS]
    moved = sum(tensor_nbytes(t) for t in _tensors((node.args, node.kwargs, node.meta.get("val"))))
    rate = costs.flop_rate(getattr(node.meta.get("val"), "dtype", None))
    return _flops(node) / rate + moved / costs.memory_bytes_per_s


def start_times(graph: fx.Graph, costs: DeviceCosts) -> dict[fx.Node, float]:
    """Modelled time at which each node starts, running the graph in its order from 0."""
    starts = {}
    clock = 0.0
    for node in graph.nodes:
        starts[node] = clock
        clock += node_time(node, costs)
    return starts


def _flops(node: fx.Node) -> int:
    formula = flop_registry.get(getattr(node.target, "overloadpacket", None))
    if formula is None:
        return 0
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
    return size_hint(formula(*args, **kwargs, out_val=node.meta.get("val")))


def _tensors(tree: object) -> list[torch.Tensor]:
    """The tensors in ``tree``, each fx.Node standing for its ``meta["val"]``."""
    found: list[torch.Tensor] = []

    def visit(leaf: object) -> None:
        val = leaf.meta.get("val") if isinstance(leaf, fx.Node) else leaf
        for v in val if isinstance(val, (tuple, list)) else (val,):
            if isinstance(v, torch.Tensor):
                found.append(v)

    fx.node.map_aggregate(tree, visit)
    return found
