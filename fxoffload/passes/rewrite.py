"""Insert the store ops into forward and the wait ops into backward.

Forward: right after each stored value ``x`` is produced,
``x_handle = ssdtrain.store(x, ...)``, and ``x_handle`` takes the saved
output slot of every member of the store (``x`` itself, or the views of
``x`` that ``views.py`` grouped; user outputs keep ``x``). Backward: each
member's placeholder ``m`` becomes ``m_handle`` in the same position, and
just before the first use of any member, ``ssdtrain.prefetch`` then
``ssdtrain.wait`` give ``x`` back as ``x_restored``, from which the views
are replayed. The prefetch lands next to its wait here; ``schedule.py``
moves it earlier.
"""

from __future__ import annotations

import torch.fx as fx

from fxoffload import ops
from fxoffload.passes.saved import META_KEY, SavedValue, backward_inputs, dense_dim_order
from fxoffload.passes.views import Stored


def insert_store_ops(
    fw_gm: fx.GraphModule,
    stores: list[Stored],
    records: dict[str, SavedValue],
    *,
    num_fwd_outputs: int,
    engine: str,
) -> None:
    graph = fw_gm.graph
    nodes = {n.name: n for n in graph.nodes}
    handles: dict[fx.Node, fx.Node] = {}
    for store in stores:
        node = nodes[store.value]
        val = node.meta["val"]
        order = dense_dim_order(val)
        with graph.inserting_after(node):
            handle = graph.create_node(
                "call_function",
                ops.store,
                (node, engine, order),
                name=f"{node.name}_handle",
            )
        with val.fake_mode:
            handle.meta["val"] = ops.store(val, engine, order)
        handle.meta[META_KEY] = records[store.value]
        handles.update((nodes[m], handle) for m in store.members)

    (output,) = graph.find_nodes(op="output")
    results = list(output.args[0])
    for i in range(num_fwd_outputs, len(results)):
        results[i] = handles.get(results[i], results[i])
    output.args = (tuple(results),)
    graph.lint()
    fw_gm.recompile()


def insert_wait_ops(
    bw_gm: fx.GraphModule, stores: list[Stored], records: dict[str, SavedValue]
) -> None:
    graph = bw_gm.graph
    placeholders = backward_inputs(graph)
    position = {n: i for i, n in enumerate(graph.nodes)}
    for store in stores:
        members = {name: placeholders[name] for name in store.members}
        handles = {}
        for name, member in members.items():
            with graph.inserting_before(member):
                handles[name] = graph.placeholder(f"{member.name}_handle")
            handles[name].meta[META_KEY] = records[name]
        first = handles[store.members[0]]
        first.meta[META_KEY] = records[store.value]
        uses = (u for m in members.values() for u in m.users)
        first_use = min(uses, key=position.__getitem__)
        with graph.inserting_before(first_use):
            restored = _prefetch_and_wait(graph, first, store)
            rebuilt = _replay_views(graph, restored, store)
        with store.val.fake_mode:  # as in forward, where every member's slot holds one handle
            handle_val = ops.store(store.val, "", dense_dim_order(store.val))
        for name, member in members.items():
            handles[name].meta["val"] = handle_val
            member.replace_all_uses_with(rebuilt[name])
            graph.erase_node(member)
    graph.lint()
    bw_gm.recompile()


def _prefetch_and_wait(graph: fx.Graph, handle: fx.Node, store: Stored) -> fx.Node:
    """``x_token = prefetch(handle)``; ``x_restored = wait(...)``, at the insertion point."""
    val = store.val
    order = dense_dim_order(val)
    with val.fake_mode:
        handle_val = ops.store(val, "", order)
        token_val = ops.prefetch(handle_val)
        wait_val = ops.wait(handle_val, token_val, val.dtype, val.device, order)
    token = graph.create_node("call_function", ops.prefetch, (handle,), name=f"{store.value}_token")
    token.meta["val"] = token_val
    restored = graph.create_node(
        "call_function",
        ops.wait,
        (handle, token, val.dtype, val.device, order),
        name=f"{store.value}_restored",
    )
    restored.meta["val"] = wait_val
    return restored


def _replay_views(graph: fx.Graph, restored: fx.Node, store: Stored) -> dict[str, fx.Node]:
    """Each member rebuilt from ``restored`` by its forward view ops, shared prefixes once."""
    copies: dict[fx.Node, fx.Node] = {}
    rebuilt = {}
    for member, chain in store.chains.items():
        node = restored
        for view in chain:
            if view not in copies:
                copies[view] = graph.node_copy(view, lambda _, source=node: source)
            node = copies[view]
        rebuilt[member] = node
    return rebuilt
