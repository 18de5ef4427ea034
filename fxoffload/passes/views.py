"""Store a base once for several saved views of it; rebuild the views in backward.

The partitioner often saves several views of one activation (``relu``,
its transpose, a reshaped copy for a batched matmul, a ``detach``). Stored
one by one, the same bytes would be written and read once per view. Here
the views chosen for offloading are grouped by the tensor they view: when
the base is no larger than they are together, the base is stored once, each
view's saved slot takes the base's handle, and backward replays the view ops
from the forward graph on the restored base. A view op only reinterprets its
input's bytes, so the rebuilt views are bitwise the originals. This holds for
a single view too (GPT-2's ``Conv1D`` saves a transposed input for its weight
gradient): the write then starts when the base's bytes exist, not where the
partitioner put the view node, often near the end of forward.

A view with gaps (attention's query, key and value selected from one fused
projection) cannot be stored on its own, since only dense layouts are
restored; it is offloaded only this way, through its base, even alone when
the base is no larger than it, and is kept in memory otherwise.

Only chains of view ops whose other arguments are constants are replayed: a
view whose sizes are symbolic (dynamic shapes) takes values that exist in
forward only, and is stored on its own, as before.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from fxoffload._compat import size_hint
from fxoffload.passes.saved import (
    SavedKind,
    SavedValue,
    dense_dim_order,
    is_view,
    tensor_nbytes,
)


@dataclasses.dataclass(frozen=True)
class Stored:
    """One store: the forward value written, and the saved values rebuilt from it.

    ``members`` are the saved slots the handle fills, in slot order; for a
    value stored on its own it is ``[value]``. ``chains[m]`` is the forward
    view nodes that make member ``m`` from ``value``, in the order they run
    (empty for ``value`` itself). ``val`` is ``value``'s fake tensor.
    """

    value: str
    members: list[str]
    chains: dict[str, list[fx.Node]]
    val: torch.Tensor

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.val)


def group_views(
    fw_gm: fx.GraphModule, planned: list[SavedValue]
) -> tuple[list[SavedValue], list[Stored]]:
    """Group the offloaded views of one base; return the updated records and the stores.

    Records of grouped views get ``rebuilt_from``; a base that is not itself
    a saved value gets a record of its own (it is what is written).
    """
    nodes = {n.name: n for n in fw_gm.graph.nodes}
    by_base: dict[fx.Node, list[tuple[SavedValue, list[fx.Node]]]] = {}
    for value in planned:
        if value.offload:
            base, chain = _view_chain(nodes[value.name])
            by_base.setdefault(base, []).append((value, chain))

    records = {v.name: v for v in planned}
    stores = []
    for base, members in by_base.items():
        if base.name in records and not records[base.name].offload:
            # The base stays in memory: so do its views, which cost nothing more.
            for v, _ in members:
                records[v.name] = dataclasses.replace(
                    v, offload=False, reason=f"view of {base.name}, which stays in memory"
                )
            continue
        gaps = {v.name for v, _ in members if dense_dim_order(nodes[v.name].meta["val"]) is None}
        why_not = _why_base_not_stored(base, sum(v.nbytes for v, _ in members))
        if why_not or all(not chain for _, chain in members):
            for v, _ in members:
                val = nodes[v.name].meta["val"]
                if v.name not in gaps:
                    stores.append(Stored(v.name, [v.name], {v.name: []}, val))
                    continue
                why = why_not if base is not nodes[v.name] else "its view ops take symbols"
                records[v.name] = dataclasses.replace(
                    v,
                    offload=False,
                    reason=f"strides {list(val.stride())} leave gaps or overlap, so it is "
                    f"stored only through its base, and {why}",
                )
            continue
        names = [v.name for v, _ in members]
        if base.name not in records:
            records[base.name] = _base_record(base, names)
        for v, _ in members:
            if v.name != base.name:
                records[v.name] = dataclasses.replace(
                    v, rebuilt_from=base.name, reason=f"view of {base.name}, rebuilt from it"
                )
        chains = {v.name: chain for v, chain in members}
        stores.append(Stored(base.name, names, chains, base.meta["val"]))
    order = [v.name for v in planned]
    extra = [name for name in records if name not in order]
    return [records[name] for name in order + extra], stores


def erase_unused_views(fw_gm: fx.GraphModule, stores: list[Stored]) -> None:
    """Drop the forward views that were made only to be saved, once backward has copied them."""
    erased: set[fx.Node] = set()
    for store in stores:
        for chain in store.chains.values():
            for view in reversed(chain):
                if view not in erased and not view.users:
                    fw_gm.graph.erase_node(view)
                    erased.add(view)
    fw_gm.graph.lint()
    fw_gm.recompile()


def _view_chain(node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The first non-view node under ``node`` and the view nodes from it to ``node``."""
    chain = []
    while _replayable_view(node):
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def _replayable_view(node: fx.Node) -> bool:
    if not is_view(node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    others: list[object] = []
    fx.node.map_aggregate((node.args[1:], node.kwargs), others.append)
    return not any(isinstance(o, (fx.Node, torch.SymInt)) for o in others)


def _why_base_not_stored(base: fx.Node, members_nbytes: int) -> str | None:
    """Why ``base`` is not stored for views totalling ``members_nbytes``; None if it is."""
    val = base.meta.get("val")
    if not (
        base.op == "call_function"
        and isinstance(val, torch.Tensor)
        and dense_dim_order(val) is not None
        and size_hint(val.storage_offset()) == 0
    ):
        return f"its base {base.name} is not a dense tensor computed in forward"
    if tensor_nbytes(val) > members_nbytes:
        return f"its base {base.name} is larger than its offloaded views together"
    return None


def _base_record(base: fx.Node, views: list[str]) -> SavedValue:
    val = base.meta["val"]
    return SavedValue(
        name=base.name,
        kind=SavedKind.ACTIVATION,
        shape=tuple(val.shape),
        dtype=val.dtype,
        nbytes=tensor_nbytes(val),
        offload=True,
        reason=f"not saved, but stored once for its saved views {', '.join(views)}",
        is_saved=False,
    )
