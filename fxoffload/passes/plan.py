"""Choose what to offload: the candidates by policy, then, under ``"adaptive"``, the stores
whose I/O the disk hides.

``select_candidates`` applies ``policy`` and ``min_bytes`` to the saved values;
``views.py`` then groups them into the stores the graph will really get (a
view's bytes are written as its base's, from when the base is made);
``plan_stores`` decides each store on the timeline of ``timeline.py``, the
same one ``schedule.py`` places the reads by.

A store is accepted, in the order forward makes the values, if:

- its write, queued behind the accepted ones, ends before forward does
  (after that, the tensor is still in memory at the peak, the start of
  backward, and its write competes with backward's reads), and the store
  does not wait on ``max_inflight_bytes`` (the engine's own setting);
- every accepted read, its own included, still ends before its first use
  when each is read as late as it can be;
- the step time offloading pays by the model (each store's copy into
  staging, and the compute its I/O takes where the device's cores compute)
  stays within ``max_overhead`` of the modelled step.

The earliest-made activations have the most forward left to write them in
and are needed last in backward; the last layers' ones are needed first, and
stay. Finally, if the reads would hold more than ``prefetch_budget_bytes`` at
once, the latest-made stores among those holding the bytes are kept, one at a
time, until they fit, and the plan is made again without them, so that what
they would have cost goes to other stores.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch.fx as fx

from fxoffload.options import Options
from fxoffload.passes.costs import DeviceCosts, start_times
from fxoffload.passes.saved import SavedValue, backward_inputs
from fxoffload.passes.timeline import (
    Read,
    ReadQueue,
    WriteQueue,
    latest_starts,
    peak_bytes_read_ahead,
)
from fxoffload.passes.views import Stored

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Transfer:
    """A store's timing: when forward makes its bytes and when backward first reads them."""

    name: str
    nbytes: int
    produced: float
    first_use: float


def select_candidates(saved: list[SavedValue], options: Options) -> list[SavedValue]:
    """Apply ``policy="none"`` and ``min_bytes``; the rest keep their classification."""
    selected = []
    for value in saved:
        if value.offload and options.policy == "none":
            value = dataclasses.replace(value, offload=False, reason='policy "none"')
        elif value.offload and value.nbytes < options.min_bytes:
            value = dataclasses.replace(
                value,
                offload=False,
                reason=f"{value.nbytes} bytes < min_bytes={options.min_bytes}",
            )
        selected.append(value)
    return selected


def plan_stores(
    planned: list[SavedValue],
    stores: list[Stored],
    fw_graph: fx.Graph,
    bw_graph: fx.Graph,
    *,
    options: Options,
    costs: DeviceCosts | None,
    store_limit: int | None = None,
) -> tuple[list[SavedValue], list[Stored]]:
    """Under ``"adaptive"``, keep the stores the model says cannot be hidden; then, given
    ``store_limit``, all but the first that many forward makes (a memory budget that
    needs no more).

    Returns the records (a kept store's members say why; a base that was not
    itself saved is dropped with its store) and the stores that remain.
    """
    if options.policy == "adaptive":
        graphs = (fw_graph, bw_graph)
        planned, stores = _plan_adaptive_stores(planned, stores, graphs, options, costs)
    if store_limit is not None and len(stores) > store_limit:
        position = {n.name: i for i, n in enumerate(fw_graph.nodes)}
        stores = sorted(stores, key=lambda s: position[s.value])
        why = (
            f"not needed: memory_budget is met by the {store_limit} stores made before it"
            if store_limit
            else "not needed: memory_budget is met without offloading"
        )
        records = {v.name: v for v in planned}
        for store in stores[store_limit:]:
            _keep_store(records, store, why)
        planned, stores = (
            [records[v.name] for v in planned if v.name in records],
            stores[:store_limit],
        )
    for value in planned:
        if not value.offload:
            log.debug("keep %s: %s", value.name, value.reason)
    return planned, stores


def _plan_adaptive_stores(
    planned: list[SavedValue],
    stores: list[Stored],
    graphs: tuple[fx.Graph, fx.Graph],
    options: Options,
    costs: DeviceCosts | None,
) -> tuple[list[SavedValue], list[Stored]]:
    """``plan_stores`` under ``"adaptive"``, on the forward and backward ``graphs``."""
    fw_graph, bw_graph = graphs
    if costs is None:
        raise ValueError('policy "adaptive" needs device costs')
    fw_starts, bw_starts = start_times(fw_graph, costs), start_times(bw_graph, costs)
    transfers = _transfers(stores, fw_graph, fw_starts, bw_graph, bw_starts)
    (fw_output,) = fw_graph.find_nodes(op="output")
    (bw_output,) = bw_graph.find_nodes(op="output")
    fw_end = fw_starts[fw_output]
    decisions = plan_adaptive(
        transfers,
        fw_end=fw_end,
        step=fw_end + bw_starts[bw_output],
        costs=costs,
        options=options,
    )
    records = {v.name: v for v in planned}
    kept_stores = []
    for store in stores:
        offload, why = decisions[store.value]
        if offload:
            record = records[store.value]
            if store.value not in store.members:  # keep saying what it is stored for
                why = f"{record.reason}; {why}"
            records[store.value] = dataclasses.replace(record, reason=why)
            kept_stores.append(store)
            continue
        _keep_store(records, store, why)
    return [records[v.name] for v in planned if v.name in records], kept_stores


def _keep_store(records: dict[str, SavedValue], store: Stored, why: str) -> None:
    """Keep ``store``'s members in memory, saying ``why``; a base stored only for its views
    goes."""
    if store.value not in store.members:
        del records[store.value]
    for name in store.members:
        records[name] = dataclasses.replace(
            records[name], offload=False, rebuilt_from=None, reason=why
        )


def plan_adaptive(
    transfers: list[Transfer],
    *,
    fw_end: float,
    step: float,
    costs: DeviceCosts,
    options: Options,
) -> dict[str, tuple[bool, str]]:
    """Decide each transfer: ``name -> (offload, reason)``.

    ``fw_end`` and ``step`` are the modelled compute times of forward and of
    the whole step, without offloading. The stores the prefetch budget keeps
    gave nothing back to ``max_overhead`` while they were accepted, so the
    plan is made again without them until the budget keeps none: each round
    keeps one more store at least, and in practice there are one or two.
    """
    kept: dict[str, str] = {}
    while True:
        plan = _accept(transfers, kept, fw_end=fw_end, step=step, costs=costs, options=options)
        fitting = _fit_prefetch_budget(plan.accepted, plan.reads, options.prefetch_budget_bytes)
        dropped = {t.name for t in plan.accepted} - {t.name for t in fitting[0]}
        if not dropped:
            break
        kept.update({name: fitting[1] for name in dropped})
    decisions = dict(plan.decisions)
    starts = latest_starts([plan.reads[t.name] for t in plan.accepted])
    for t in plan.accepted:
        read_end = starts[t.name] + plan.reads[t.name].seconds
        decisions[t.name] = (
            True,
            f"hidden: written {_ms(fw_end + plan.delay - plan.write_ends[t.name])} before "
            f"forward ends, read from {_ms(starts[t.name])} into backward, "
            f"{_ms(max(t.first_use - read_end, 0.0))} before first use; "
            f"costs {_ms(costs.offload_overhead(t.nbytes))}",
        )
    return decisions


@dataclasses.dataclass
class _Accepted:
    """One greedy pass of :func:`plan_adaptive`: the stores it accepted and why others stay."""

    accepted: list[Transfer]
    decisions: dict[str, tuple[bool, str]]
    reads: dict[str, Read]
    write_ends: dict[str, float]
    delay: float
    """The accepted stores' staging copies: how much later forward ends."""


def _accept(
    transfers: list[Transfer],
    kept: dict[str, str],
    *,
    fw_end: float,
    step: float,
    costs: DeviceCosts,
    options: Options,
) -> _Accepted:
    """Accept stores in the order forward makes them, as the module says; those in ``kept``
    stay, for the reason it gives. O(n log n)."""
    safety = options.io_safety
    reads = {
        t.name: Read(t.name, t.first_use, safety * costs.read_time(t.nbytes), t.nbytes)
        for t in transfers
    }
    read_queue, write_queue = ReadQueue(list(reads.values())), WriteQueue()
    allowed = options.max_overhead * step
    spent = delay = 0.0  # the accepted stores' overhead, and the part of it in forward
    decisions: dict[str, tuple[bool, str]] = {}
    accepted: list[Transfer] = []
    write_ends: dict[str, float] = {}
    for t in sorted(transfers, key=lambda t: t.produced):
        copied = t.produced + delay + costs.copy_time(t.nbytes)
        overhead = costs.offload_overhead(t.nbytes)
        waiting = write_queue.bytes_waiting(copied)
        write_seconds = safety * costs.write_time(t.nbytes)
        write_end = write_queue.end_if_added(copied, write_seconds)
        forward_ends = fw_end + delay + costs.copy_time(t.nbytes)
        slack, tightest = read_queue.slack_if_added(reads[t.name])
        if t.name in kept:
            why = kept[t.name]
        elif t.nbytes > options.prefetch_budget_bytes:
            why = f"{t.nbytes} bytes > prefetch_budget_bytes={options.prefetch_budget_bytes}"
        elif waiting + t.nbytes > options.max_inflight_bytes:
            why = (
                f"store would wait: {waiting} bytes still being written "
                f"(max_inflight_bytes={options.max_inflight_bytes})"
            )
        elif write_end > forward_ends:
            why = f"write would end {_ms(write_end - forward_ends)} after forward"
        elif slack < 0:
            who = "its read" if tightest == t.name else f"reading it would make {tightest}'s read"
            why = f"{who} end {_ms(-slack)} after first use in backward"
        elif spent + overhead > allowed:
            why = (
                f"its copy and I/O would cost {_ms(overhead)} of step time; "
                f"max_overhead={options.max_overhead} leaves {_ms(allowed - spent)}"
            )
        else:
            read_queue.add(reads[t.name])
            write_ends[t.name] = write_queue.add(copied, write_seconds, t.nbytes)
            spent += overhead
            delay += costs.copy_time(t.nbytes)
            accepted.append(t)
            continue
        decisions[t.name] = (False, why)
    return _Accepted(accepted, decisions, reads, write_ends, delay)


def _fit_prefetch_budget(
    accepted: list[Transfer], reads: dict[str, Read], budget: int
) -> tuple[list[Transfer], str]:
    """The stores left once the latest-made among those read ahead at the peak are kept, one
    at a time, until the peak fits; and the reason those say."""
    order = {t.name: i for i, t in enumerate(accepted)}
    why = ""
    while accepted:
        chosen = [reads[t.name] for t in accepted]
        peak, holding = peak_bytes_read_ahead(chosen, latest_starts(chosen))
        if peak <= budget:
            break
        why = why or f"reads would hold {peak} bytes ahead of use (prefetch_budget_bytes={budget})"
        latest = max(holding, key=lambda r: order[r.name])
        accepted = [t for t in accepted if t.name != latest.name]
    return accepted, why


def _transfers(
    stores: list[Stored],
    fw_graph: fx.Graph,
    fw_starts: dict[fx.Node, float],
    bw_graph: fx.Graph,
    bw_starts: dict[fx.Node, float],
) -> list[Transfer]:
    """Each store's timing; its bytes exist when the node after the one that makes them starts."""
    fw_nodes = {n.name: n for n in fw_graph.nodes}
    bw_inputs = backward_inputs(bw_graph)
    transfers = []
    for store in stores:
        uses = [u for m in store.members if m in bw_inputs for u in bw_inputs[m].users]
        transfers.append(
            Transfer(
                name=store.value,
                nbytes=store.nbytes,
                produced=fw_starts[fw_nodes[store.value].next],
                first_use=min((bw_starts[u] for u in uses), default=math.inf),
            )
        )
    return transfers


def _ms(seconds: float) -> str:
    """A duration for a reason string: microseconds below a millisecond."""
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"
