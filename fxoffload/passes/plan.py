"""Choose which candidate activations to offload under the configured policy.

``"adaptive"`` offloads what the disk can hide behind compute, by the cost
model of ``costs.py``. Two queues are simulated, each served one transfer at
a time in the order the graphs need them:

- writes, in forward, in the order the values are produced: a write must end
  before forward does (after that, the tensor is still in memory at the peak,
  the start of backward, and its write competes with backward's reads), and
  a store must not wait on ``max_inflight_bytes``;
- reads, in backward, in the order of first use, each starting as soon as
  the disk is free and the prefetched bytes not yet used fit
  ``prefetch_budget_bytes``: a read must end before its value's first use.

Candidates are taken in production order, each kept if adding it would make
any transfer late. The earliest-made activations have the most forward left
to write them in and are needed last in backward; the last layers' ones are
needed first, and stay.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch.fx as fx

from fxoffload.options import Options
from fxoffload.passes.costs import DeviceCosts, start_times
from fxoffload.passes.saved import SavedValue, backward_inputs

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Transfer:
    """A candidate's timing: when forward makes it and when backward first reads it."""

    name: str
    nbytes: int
    produced: float
    first_use: float


def plan_offload(
    saved: list[SavedValue],
    fw_graph: fx.Graph,
    bw_graph: fx.Graph,
    *,
    options: Options,
    costs: DeviceCosts | None,
) -> list[SavedValue]:
    """Return the records with their final ``offload`` decision and reason.

    ``"all"`` offloads every candidate of at least ``min_bytes``; ``"none"``
    offloads nothing (the baseline); ``"adaptive"`` (which needs ``costs``)
    offloads the candidates whose transfers the model says are hidden.
    Non-candidates keep their classification.
    """
    planned = []
    for value in saved:
        if value.offload and options.policy == "none":
            value = dataclasses.replace(value, offload=False, reason='policy "none"')
        elif value.offload and value.nbytes < options.min_bytes:
            value = dataclasses.replace(
                value,
                offload=False,
                reason=f"{value.nbytes} bytes < min_bytes={options.min_bytes}",
            )
        planned.append(value)
    if options.policy == "adaptive":
        if costs is None:
            raise ValueError('policy "adaptive" needs device costs')
        fw_starts, bw_starts = start_times(fw_graph, costs), start_times(bw_graph, costs)
        candidates = [v for v in planned if v.offload]
        transfers = _transfers(candidates, fw_graph, fw_starts, bw_graph, bw_starts)
        (output,) = fw_graph.find_nodes(op="output")
        reasons = plan_adaptive(transfers, fw_end=fw_starts[output], costs=costs, options=options)
        planned = [
            dataclasses.replace(v, offload=reasons[v.name][0], reason=reasons[v.name][1])
            if v.name in reasons
            else v
            for v in planned
        ]
    for value in planned:
        if not value.offload:
            log.debug("keep %s: %s", value.name, value.reason)
    return planned


def plan_adaptive(
    transfers: list[Transfer], *, fw_end: float, costs: DeviceCosts, options: Options
) -> dict[str, tuple[bool, str]]:
    """Decide each transfer: ``name -> (offload, reason)``."""
    safety = options.io_safety
    decisions: dict[str, tuple[bool, str]] = {}
    accepted: list[Transfer] = []
    write_free = 0.0  # when the disk finishes the accepted writes so far
    writes: list[tuple[float, int]] = []  # (end, bytes) of each accepted write
    for t in sorted(transfers, key=lambda t: t.produced):
        if t.nbytes > options.prefetch_budget_bytes:
            decisions[t.name] = (
                False,
                f"{t.nbytes} bytes > prefetch_budget_bytes={options.prefetch_budget_bytes}",
            )
            continue
        waiting = sum(b for end, b in writes if end > t.produced)
        if waiting + t.nbytes > options.max_inflight_bytes:
            decisions[t.name] = (
                False,
                f"store would wait: {waiting} bytes still being written "
                f"(max_inflight_bytes={options.max_inflight_bytes})",
            )
            continue
        write_end = max(t.produced, write_free) + safety * costs.write_time(t.nbytes)
        if write_end > fw_end:
            decisions[t.name] = (False, f"write would end {_ms(write_end - fw_end)} after forward")
            continue
        late = _late_reads([*accepted, t], costs, options)
        if late:
            name, by = late
            who = "its read" if name == t.name else f"reading it would make {name}'s read"
            decisions[t.name] = (False, f"{who} end {_ms(by)} after first use in backward")
            continue
        accepted.append(t)
        writes.append((write_end, t.nbytes))
        write_free = write_end
    read_ends = _read_ends(accepted, costs, options)
    for t, (write_end, _) in zip(accepted, writes, strict=True):
        decisions[t.name] = (
            True,
            f"hidden: written {_ms(fw_end - write_end)} before forward ends, "
            f"read {_ms(t.first_use - read_ends[t.name])} before first use",
        )
    return decisions


def _late_reads(
    transfers: list[Transfer], costs: DeviceCosts, options: Options
) -> tuple[str, float] | None:
    """The first read that would end after its value's first use, and by how much."""
    ends = _read_ends(transfers, costs, options)
    for t in sorted(transfers, key=lambda t: t.first_use):
        if ends[t.name] > t.first_use:
            return t.name, ends[t.name] - t.first_use
    return None


def _read_ends(transfers: list[Transfer], costs: DeviceCosts, options: Options) -> dict[str, float]:
    """When each read ends: in order of first use, as early as the disk and budget allow."""
    ends: dict[str, float] = {}
    disk_free = 0.0
    held: list[Transfer] = []  # read, not yet used
    for t in sorted(transfers, key=lambda t: t.first_use):
        start = disk_free
        while True:
            held = [h for h in held if h.first_use > start]
            if sum(h.nbytes for h in held) + t.nbytes <= options.prefetch_budget_bytes:
                break
            start = min(h.first_use for h in held)
        disk_free = ends[t.name] = start + options.io_safety * costs.read_time(t.nbytes)
        held.append(t)
    return ends


def _transfers(
    candidates: list[SavedValue],
    fw_graph: fx.Graph,
    fw_starts: dict[fx.Node, float],
    bw_graph: fx.Graph,
    bw_starts: dict[fx.Node, float],
) -> list[Transfer]:
    """Each candidate's timing; a value is made when the node after its own starts."""
    fw_nodes = {n.name: n for n in fw_graph.nodes}
    bw_nodes = backward_inputs(bw_graph)
    transfers = []
    for value in candidates:
        made = fw_nodes[value.name]
        uses = bw_nodes[value.name].users if value.name in bw_nodes else {}
        transfers.append(
            Transfer(
                name=value.name,
                nbytes=value.nbytes,
                produced=fw_starts[made.next],
                first_use=min((bw_starts[u] for u in uses), default=math.inf),
            )
        )
    return transfers


def _ms(seconds: float) -> str:
    """A duration for a reason string: microseconds below a millisecond."""
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"
