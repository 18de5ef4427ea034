"""Insert the store ops into forward and the wait ops into backward.

Forward: right after each offloaded value ``x`` is produced,
``x_handle = ssdtrain.store(x, ...)`` and ``x_handle`` takes ``x``'s saved
output slot (user outputs keep ``x``). Backward: the placeholder ``x``
becomes ``x_handle`` in the same position, and just before ``x``'s first use,
``ssdtrain.prefetch`` then ``ssdtrain.wait`` give ``x`` back. The prefetch
lands next to its wait here; ``schedule.py`` moves it earlier.
"""

from __future__ import annotations

import torch.fx as fx

from fxoffload import ops
from fxoffload.passes.saved import META_KEY, SavedValue, dense_dim_order, saved_value_nodes


def insert_store_ops(
    fw_gm: fx.GraphModule, offloaded: list[SavedValue], *, num_fwd_outputs: int, offload_dir: str
) -> None:
    graph = fw_gm.graph
    names = {v.name for v in offloaded}
    handles: dict[fx.Node, fx.Node] = {}
    for node in saved_value_nodes(fw_gm, num_fwd_outputs):
        if node.name not in names:
            continue
        val = node.meta["val"]
        order = dense_dim_order(val)
        with graph.inserting_after(node):
            handle = graph.create_node(
                "call_function",
                ops.store,
                (node, offload_dir, order),
                name=f"{node.name}_handle",
            )
        with val.fake_mode:
            handle.meta["val"] = ops.store(val, offload_dir, order)
        handle.meta[META_KEY] = node.meta[META_KEY]
        handles[node] = handle

    (output,) = graph.find_nodes(op="output")
    results = list(output.args[0])
    for i in range(num_fwd_outputs, len(results)):
        results[i] = handles.get(results[i], results[i])
    output.args = (tuple(results),)
    graph.lint()
    fw_gm.recompile()


def insert_wait_ops(bw_gm: fx.GraphModule, offloaded: list[SavedValue]) -> None:
    graph = bw_gm.graph
    names = {v.name for v in offloaded}
    position = {n: i for i, n in enumerate(graph.nodes)}
    for placeholder in list(graph.find_nodes(op="placeholder")):
        if placeholder.name not in names:
            continue
        val = placeholder.meta["val"]
        order = dense_dim_order(val)
        with graph.inserting_before(placeholder):
            handle = graph.placeholder(f"{placeholder.name}_handle")
        with val.fake_mode:
            handle.meta["val"] = ops.store(val, "", order)
            token_val = ops.prefetch(handle.meta["val"])
            wait_val = ops.wait(handle.meta["val"], token_val, val.dtype, val.device, order)
        handle.meta[META_KEY] = placeholder.meta[META_KEY]

        first_use = min(placeholder.users, key=position.__getitem__)
        with graph.inserting_before(first_use):
            token = graph.create_node(
                "call_function", ops.prefetch, (handle,), name=f"{placeholder.name}_token"
            )
            token.meta["val"] = token_val
            restored = graph.create_node(
                "call_function",
                ops.wait,
                (handle, token, val.dtype, val.device, order),
                name=f"{placeholder.name}_restored",
            )
            restored.meta["val"] = wait_val
        placeholder.replace_all_uses_with(restored)
        graph.erase_node(placeholder)
    graph.lint()
    bw_gm.recompile()
