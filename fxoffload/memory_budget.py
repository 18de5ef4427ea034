"""One memory budget: keep, offload or recompute each saved tensor.

``memory_budget=b`` asks that the saved-activation bytes still in memory when
backward starts, with offloading's own staging buffers, be at most ``b`` times
the saved-activation bytes of PyTorch's min-cut partition with nothing
offloaded and no budget (the reference PyTorch's own
``activation_memory_budget`` uses). Offloading hides what the disk can hide
for free; recomputation buys the rest.

Recomputation is PyTorch's: its min-cut partitioner and its knapsack over
recomputable nodes, run at each budget of a fixed grid (``PYTORCH_BUDGETS``),
with its own ban heuristics and RNG rules. Each partition is planned for
offloading by the passes; its candidates offload the first ``k`` of that
plan's stores, for every ``k``, so that a budget that needs fewer stores pays
for fewer. Each candidate has a modelled step: forward and backward compute,
plus offloading's own cost.

The fastest candidate that fits the budget is taken; if none fits, the one
that keeps the fewest bytes. Choosing the fastest fitting candidate from one
fixed set makes the resident bytes monotonic in the budget: a lower budget
can only remove candidates, and it replaces the chosen one only if that one
no longer fits, with one that fits the lower budget. The note also gives the
plan's modelled peak in backward (``liveness.py``): recomputation at low
PyTorch budgets can move bytes from the start of backward into backward
itself, which the resident bytes do not show.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch.fx as fx

from fxoffload import ops
from fxoffload.options import Options
from fxoffload.passes import SavedKind, SavedValue, offload_saved_activations
from fxoffload.passes.costs import DeviceCosts, start_times
from fxoffload.passes.liveness import backward_peak_bytes
from fxoffload.passes.saved import tensor_nbytes
from fxoffload.passes.timeline import WriteQueue

PYTORCH_BUDGETS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
"""The ``activation_memory_budget`` values whose partitions the plan chooses from."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """The chosen partition at a PyTorch budget, planned for offloading."""

    pytorch_budget: float
    fw_gm: fx.GraphModule
    bw_gm: fx.GraphModule
    decisions: list[SavedValue]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A partition offloading the first ``stores`` stores of its adaptive plan."""

    pytorch_budget: float
    stores: int
    resident_bytes: int
    """Saved activations kept, and staging buffers held, when backward starts."""
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
    passes = {
        "num_fwd_outputs": num_fwd_outputs,
        "static_input_indices": static_input_indices,
        "options": options,
        "costs": costs,
    }
    plans, candidates = {}, []
    for pytorch_budget in PYTORCH_BUDGETS:
        fw_gm, bw_gm = partition(pytorch_budget)
        decisions = offload_saved_activations(fw_gm, bw_gm, **passes)
        plans[pytorch_budget] = Plan(pytorch_budget, fw_gm, bw_gm, decisions)
        candidates.extend(
            Candidate(pytorch_budget, k, resident, step)
            for k, (resident, step) in enumerate(_prefixes(fw_gm, bw_gm, decisions, costs, options))
        )
        if pytorch_budget == PYTORCH_BUDGETS[0]:
            reference_step = candidates[-1].step_seconds  # all of its stores
    reference = plans[PYTORCH_BUDGETS[0]]
    total = sum(d.nbytes for d in saved_activations(reference.decisions))
    allowed = int(options.memory_budget * total)
    fitting = [c for c in candidates if c.resident_bytes <= allowed]
    chosen = (
        min(fitting, key=lambda c: (c.step_seconds, c.resident_bytes))
        if fitting
        else min(candidates, key=lambda c: (c.resident_bytes, c.step_seconds))
    )
    plan = plans[chosen.pytorch_budget]
    if chosen.stores < len(_stores(plan.fw_gm)):  # plan it again, offloading only those
        fw_gm, bw_gm = partition(chosen.pytorch_budget)
        decisions = offload_saved_activations(fw_gm, bw_gm, store_limit=chosen.stores, **passes)
        plan = Plan(chosen.pytorch_budget, fw_gm, bw_gm, decisions)
    recomputed = _recomputed(reference.decisions, plan)
    peak = backward_peak_bytes(plan.bw_gm.graph)
    plan = dataclasses.replace(plan, decisions=[*plan.decisions, *recomputed])
    note = (
        f"memory_budget={options.memory_budget}: at most {allowed} of {total} saved-activation "
        f"bytes in memory at the start of backward; the plan keeps {chosen.resident_bytes}, "
        f"staging buffers included{'' if fitting else ' (the least any plan keeps: not reached)'}, "
        f"and {peak} with backward's own tensors at its modelled peak; "
        f"it offloads {chosen.stores} stores and recomputes {len(recomputed)} values "
        f"(PyTorch's partition at activation_memory_budget={chosen.pytorch_budget}); modelled "
        f"step {chosen.step_seconds * 1e3:.2f} ms, "
        f"{(chosen.step_seconds - reference_step) * 1e3:+.2f} ms against budget 1.0 "
        f"with the same offloading policy"
    )
    return plan, note


def resident_bytes(
    fw_gm: fx.GraphModule,
    bw_gm: fx.GraphModule,
    decisions: Sequence[SavedValue],
    costs: DeviceCosts,
    options: Options,
) -> int:
    """Saved-activation bytes a planned pair of graphs keeps in memory when backward starts,
    the staging buffers' host memory included."""
    return _prefixes(fw_gm, bw_gm, decisions, costs, options)[-1][0]


def _prefixes(
    fw_gm: fx.GraphModule,
    bw_gm: fx.GraphModule,
    decisions: Sequence[SavedValue],
    costs: DeviceCosts,
    options: Options,
) -> list[tuple[int, float]]:
    """(resident bytes, modelled step) of the plan with only its first ``k`` stores, for
    every ``k`` from 0 to all of them.

    Each store frees the bytes of the saved values it holds, adds its staging
    buffer to those the writes' timeline holds at once (every write has ended
    when backward starts, and the engine keeps up to ``staging_pool_bytes`` of
    the buffers for reuse), and costs its overhead.
    """
    saved = saved_activations(decisions)
    freed: dict[str, int] = {}
    for d in saved:
        if d.offload:
            holder = d.rebuilt_from or d.name
            freed[holder] = freed.get(holder, 0) + d.nbytes
    fw_starts = start_times(fw_gm.graph, costs)
    (fw_output,) = fw_gm.graph.find_nodes(op="output")
    (bw_output,) = bw_gm.graph.find_nodes(op="output")
    step = fw_starts[fw_output] + start_times(bw_gm.graph, costs)[bw_output]
    kept = sum(d.nbytes for d in saved)
    writes = WriteQueue()
    staged = 0
    prefixes = [(kept, step)]
    for store in _stores(fw_gm):
        nbytes = tensor_nbytes(store.args[0].meta["val"])
        kept -= freed.get(store.args[0].name, 0)
        writes.add(fw_starts[store], options.io_safety * costs.write_time(nbytes), nbytes)
        staged = min(writes.peak_bytes, options.staging_pool_bytes)
        step += costs.offload_overhead(nbytes)
        prefixes.append((kept + staged, step))
    return prefixes


def _stores(fw_gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's stores, in the order forward makes their values."""
    return fw_gm.graph.find_nodes(op="call_function", target=ops.store)


def saved_activations(decisions: Sequence[SavedValue]) -> list[SavedValue]:
    """The decisions of saved activations (not the bases stored only for their views)."""
    return [d for d in decisions if d.kind is SavedKind.ACTIVATION and d.is_saved]


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
