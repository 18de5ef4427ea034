"""One memory budget: keep, offload or recompute each saved tensor.

``memory_budget=b`` asks that the saved-activation bytes still in memory when
backward starts, with offloading's own staging buffers, be at most ``b`` times
the saved-activation bytes of PyTorch's min-cut partition with nothing
offloaded and no budget (the reference PyTorch's own
``activation_memory_budget`` uses). Offloading hides what the disk can hide
for free; recomputation buys the rest.

Recomputation is PyTorch's: its min-cut partitioner and its knapsack over
recomputable nodes, run at each budget of a fixed grid (``PYTORCH_BUDGETS``),
with its own ban heuristics and RNG rules. Each partition is then planned for
offloading by the passes, and the plan whose modelled step (forward and
backward compute, plus offloading's own cost) is fastest among those within
the budget is taken; if none is, the one that keeps the fewest bytes.

Choosing the fastest feasible plan from one fixed set makes the resident
bytes monotonic in the budget: a lower budget can only remove plans from the
feasible set, and it replaces the chosen one only if that one no longer fits,
with one that fits the lower budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch.fx as fx

from fxoffload import ops
from fxoffload.options import Options
from fxoffload.passes import SavedKind, SavedValue, offload_saved_activations
from fxoffload.passes.costs import DeviceCosts, start_times
from fxoffload.passes.saved import tensor_nbytes
from fxoffload.passes.timeline import WriteQueue

PYTORCH_BUDGETS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
"""The ``activation_memory_budget`` values whose partitions the plan chooses from."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """One candidate: a partition at a PyTorch budget, planned for offloading."""

    pytorch_budget: float
    fw_gm: fx.GraphModule
    bw_gm: fx.GraphModule
    decisions: list[SavedValue]
    resident_bytes: int
    step_seconds: float


Partition = Callable[[float], tuple[fx.GraphModule, fx.GraphModule]]


def plan_under_budget(
    partition: Partition,
    *,
    num_fwd_outputs: int,
    static_input_indices: list[int] | None,
    options: Options,
    costs: DeviceCosts,
) -> tuple[Plan, str]:
    """The chosen plan, and a line saying what the budget asked for and what it reached.

    ``partition(b)`` runs PyTorch's min-cut partitioner at ``activation_memory_budget=b``
    on the same joint graph. The chosen plan's decisions include a ``RECOMPUTED``
    record for every value the reference partition saves and this one does not.
    """
    plans = []
    for pytorch_budget in PYTORCH_BUDGETS:
        fw_gm, bw_gm = partition(pytorch_budget)
        decisions = offload_saved_activations(
            fw_gm,
            bw_gm,
            num_fwd_outputs=num_fwd_outputs,
            static_input_indices=static_input_indices,
            options=options,
            costs=costs,
        )
        fw_starts = start_times(fw_gm.graph, costs)
        plans.append(
            Plan(
                pytorch_budget,
                fw_gm,
                bw_gm,
                decisions,
                resident_bytes(fw_gm, fw_starts, decisions, costs, options),
                modelled_step(fw_gm, fw_starts, bw_gm, costs),
            )
        )
    reference = plans[0]
    total = sum(d.nbytes for d in saved_activations(reference.decisions))
    allowed = int(options.memory_budget * total)
    fitting = [p for p in plans if p.resident_bytes <= allowed]
    chosen = (
        min(fitting, key=lambda p: p.step_seconds)
        if fitting
        else min(plans, key=lambda p: p.resident_bytes)
    )
    recomputed = _recomputed(reference.decisions, chosen)
    chosen = dataclasses.replace(chosen, decisions=[*chosen.decisions, *recomputed])
    slower = chosen.step_seconds - reference.step_seconds
    note = (
        f"memory_budget={options.memory_budget}: at most {allowed} of {total} saved-activation "
        f"bytes in memory at the start of backward; the plan keeps {chosen.resident_bytes}, "
        f"staging buffers included"
        f"{'' if fitting else ' (the least any plan keeps: the budget is not reached)'}, "
        f"recomputing {len(recomputed)} values (PyTorch's partition at "
        f"activation_memory_budget={chosen.pytorch_budget}); modelled step "
        f"{chosen.step_seconds * 1e3:.2f} ms, {slower * 1e3:+.2f} ms against budget 1.0 "
        f"with the same offloading policy"
    )
    return chosen, note


def saved_activations(decisions: Sequence[SavedValue]) -> list[SavedValue]:
    """The decisions of saved activations (not the bases stored only for their views)."""
    return [d for d in decisions if d.kind is SavedKind.ACTIVATION and d.is_saved]


def resident_bytes(
    fw_gm: fx.GraphModule,
    starts: dict[fx.Node, float],
    decisions: Sequence[SavedValue],
    costs: DeviceCosts,
    options: Options,
) -> int:
    """Saved-activation bytes in memory when backward starts: those kept, and the host
    memory the stores' staging buffers hold then.

    Every write has ended by then (the plan sees to it), and the engine keeps
    the buffers it used for reuse, up to ``staging_pool_bytes``: as many as
    were ever in flight at once, on the writes' timeline.
    """
    kept = sum(d.nbytes for d in saved_activations(decisions) if not d.offload)
    writes = WriteQueue()
    for store in fw_gm.graph.find_nodes(op="call_function", target=ops.store):
        nbytes = tensor_nbytes(store.args[0].meta["val"])
        writes.add(starts[store], options.io_safety * costs.write_time(nbytes), nbytes)
    return kept + min(writes.peak_bytes, options.staging_pool_bytes)


def modelled_step(
    fw_gm: fx.GraphModule,
    fw_starts: dict[fx.Node, float],
    bw_gm: fx.GraphModule,
    costs: DeviceCosts,
) -> float:
    """Modelled compute of forward and backward (our ops cost nothing), plus offloading's."""
    (fw_output,) = fw_gm.graph.find_nodes(op="output")
    (bw_output,) = bw_gm.graph.find_nodes(op="output")
    total = fw_starts[fw_output] + start_times(bw_gm.graph, costs)[bw_output]
    for store in fw_gm.graph.find_nodes(op="call_function", target=ops.store):
        total += costs.offload_overhead(tensor_nbytes(store.args[0].meta["val"]))
    return total


def _recomputed(reference: list[SavedValue], chosen: Plan) -> list[SavedValue]:
    saved = {d.name for d in chosen.decisions}
    return [
        dataclasses.replace(
            d,
            kind=SavedKind.RECOMPUTED,
            offload=False,
            reason=(
                "recomputed in backward by PyTorch's partitioner at "
                f"activation_memory_budget={chosen.pytorch_budget}"
            ),
        )
        for d in saved_activations(reference)
        if d.name not in saved
    ]
