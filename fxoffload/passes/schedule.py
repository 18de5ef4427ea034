"""Place each backward prefetch so that its read ends, by the cost model, before its wait.

Each read gets the latest start of ``timeline.py``, the schedule the planner
accepted the stores by: one at a time in the order backward needs them, each
ending before its own wait and before the next read must start (its read
time times ``io_safety``, the modelled margin). Its prefetch then goes after the last
node that starts no later than that, but never before the previous
prefetch, nor while the values read ahead and not yet used would exceed
``prefetch_budget_bytes`` (then it goes right after the wait that frees
enough). Reading as late as is safe keeps the bytes read ahead, and so the
memory they hold, small.
"""

from __future__ import annotations

import torch.fx as fx

from fxoffload import ops
from fxoffload.options import Options
from fxoffload.passes.costs import DeviceCosts, start_times
from fxoffload.passes.saved import META_KEY
from fxoffload.passes.timeline import Read, latest_starts


def schedule_prefetches(bw_gm: fx.GraphModule, costs: DeviceCosts, *, options: Options) -> None:
    graph = bw_gm.graph
    waits = [n for n in graph.nodes if n.target is ops.wait]
    if not waits:
        return
    starts = start_times(graph, costs)
    reads = [
        Read(w.name, starts[w], options.io_safety * costs.read_time(_nbytes(w)), _nbytes(w))
        for w in waits
    ]
    latest_by_name = latest_starts(reads)
    latest = {w: latest_by_name[w.name] for w in waits}
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    first = index[graph.find_nodes(op="placeholder")[-1]]
    anchor = first  # prefetch goes after nodes[anchor]
    pending: list[fx.Node] = []  # waits whose prefetch is placed at or before anchor
    previous: fx.Node | None = None
    for wait in waits:
        prefetch = wait.args[1]
        assert isinstance(prefetch, fx.Node) and prefetch.target is ops.prefetch
        place = max(
            [anchor]
            + [
                i
                for i in range(first, index[wait])
                if nodes[i].target is not ops.prefetch and starts[nodes[i + 1]] <= latest[wait]
            ]
        )
        nbytes = _nbytes(wait)
        pending = [w for w in pending if index[w] > place]
        while pending and sum(map(_nbytes, pending)) + nbytes > options.prefetch_budget_bytes:
            place = index[pending.pop(0)]
        (previous if place == anchor and previous is not None else nodes[place]).append(prefetch)
        anchor, previous = place, prefetch
        pending.append(wait)
    graph.lint()
    bw_gm.recompile()


def _nbytes(wait: fx.Node) -> int:
    return wait.args[0].meta[META_KEY].nbytes
