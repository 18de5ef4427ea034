"""Move each backward prefetch earlier, so its read overlaps compute.

Reads are issued in the order backward needs them, one ahead: the first
prefetch goes to the start of backward, and each later one right after the
previous value's wait. At most two offloaded tensors are then being read or
waiting in memory at a time, and each read overlaps the compute between two
waits.
"""

from __future__ import annotations

import torch.fx as fx

from fxoffload import ops


def schedule_prefetches(bw_gm: fx.GraphModule) -> None:
    graph = bw_gm.graph
    waits = [n for n in graph.nodes if n.target is ops.wait]
    anchor = graph.find_nodes(op="placeholder")[-1] if waits else None
    for wait in waits:
        prefetch = wait.args[1]
        assert isinstance(prefetch, fx.Node) and prefetch.target is ops.prefetch
        anchor.append(prefetch)
        anchor = wait
    graph.lint()
    bw_gm.recompile()
