"""Backward's peak live bytes: saved activations and the tensors it makes.

Walks the (rewritten) backward graph in its order: a tensor a node makes is
live from that node until its last use (a view shares its base's storage
and extends its life), a gradient (a graph output) until the end; saved
activations kept in memory are live from the start until their last use; a
restored value from its prefetch, where the engine takes its read buffer.
Parameters and tangents are left out: they are alive with or without the
plan. The compiler reorders and reuses buffers, so this is a model; it shows
recomputation that moves bytes from the start of backward into backward
itself, which lowers no peak.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxoffload import ops
from fxoffload.passes.saved import META_KEY, SavedKind, is_view, tensor_nbytes


def backward_peak_bytes(bw_graph: fx.Graph) -> int:
    """The most bytes live while a node of ``bw_graph`` runs."""
    nodes = list(bw_graph.nodes)
    root: dict[fx.Node, fx.Node] = {}
    last_use: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        base = node.args[0] if is_view(node) else None
        root[node] = root[base] if isinstance(base, fx.Node) else node
        for used in node.all_input_nodes:
            last_use[root[used]] = node
    arrives = {}  # a restored value is allocated at its prefetch
    for wait in bw_graph.find_nodes(op="call_function", target=ops.wait):
        arrives.setdefault(wait.args[1], []).append(wait)
    live = {n: _nbytes(n) for n in nodes if _is_kept_activation(n)}
    current = peak = sum(live.values())
    for node in nodes:
        made = arrives.get(node, []) if node.target is ops.prefetch else []
        if node.op == "call_function" and root[node] is node and node.target is not ops.wait:
            made = [*made, node]
        for value in made:
            live[value] = _nbytes(value)
            current += live[value]
        peak = max(peak, current)
        if node.op == "output":
            break
        for used in {root[n] for n in node.all_input_nodes}:
            if last_use.get(used) is node and used in live:
                current -= live.pop(used)
    return peak


def _is_kept_activation(node: fx.Node) -> bool:
    record = node.meta.get(META_KEY)
    return (
        node.op == "placeholder"
        and record is not None
        and record.kind is SavedKind.ACTIVATION
        and not record.offload
    )


def _nbytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return sum(tensor_nbytes(v) for v in vals if isinstance(v, torch.Tensor))
