"""``simulate()``: the backend's plan, memory, step time and drive wear on given hardware.

Dynamo traces the model once, and each graph it makes is handed to the
backend's own compile (``compile_with_offloading``: the same partitioner,
passes and ``memory_budget`` planner) once per policy, on fake inputs and with
the rates of a :class:`~fxoffload.hardware.Hardware` record, so no offload
directory, engine or thread is touched and nothing is computed. A model built
on the meta device (``with torch.device("meta"): ...``) allocates nothing, so
a 70B model's layers fit on any machine; one with real tensors runs its
forward once, eagerly, so that Dynamo can go on past graph breaks.

Graphs are traced as on the CPU, whatever device the model is on: the device
changes the graphs only through kernel choice, and the CPU's
``scaled_dot_product_attention`` is a flash kernel, saving the output and the
logsumexp as FlashAttention does on a GPU (the meta device's would be the
math one, saving the whole attention matrix).

The prediction runs the rewritten graphs on one clock: each node takes the cost
model's time, a store adds its staging copy and queues its write on the
drives (one queue, their summed rate, waiting while ``max_inflight_bytes`` are
being written), a prefetch queues its read (none if its write has not ended:
the tensor is still in memory, and handed over), and a wait stalls the clock
until its read ends. The plan was made with the I/O ``io_safety`` times slower;
the prediction runs at the given rates. Several graphs (graph breaks) are each
run on their own clock and summed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from fxoffload import ops
from fxoffload._compat import FakeTensorMode, functorch_config
from fxoffload.backend import compile_with_offloading
from fxoffload.explanation import compile_once
from fxoffload.hardware import Hardware
from fxoffload.memory_budget import resident_bytes, saved_activations
from fxoffload.options import RATES, Options
from fxoffload.partitioner import PartitionResult
from fxoffload.passes import META_KEY, SavedValue
from fxoffload.passes.costs import DeviceCosts, node_time
from fxoffload.passes.saved import tensor_nbytes
from fxoffload.report import format_decisions

POLICIES = ("none", "adaptive", "all", "recompute")
"""The policies simulated by default, each without a memory budget."""
BUDGETS = (0.1, 0.3, 0.5)
"""The ``memory_budget`` values simulated by default."""


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One policy's plan and what the model predicts it costs, per training step."""

    name: str
    decisions: list[SavedValue]
    activation_bytes: int
    """Saved-activation bytes of this policy's partition, kept or offloaded (not recomputed)."""
    resident_bytes: int
    """Saved-activation bytes in memory when backward starts, staging buffers included."""
    compute_seconds: float
    overhead_seconds: float
    """Offloading's own step time: staging copies, stores waiting on ``max_inflight_bytes``."""
    stall_seconds: float
    """Backward waiting for reads."""
    bytes_written: int
    notes: tuple[str, ...] = ()
    """Under ``memory_budget``: what it asked for and what the plan reached, per graph."""

    @property
    def step_seconds(self) -> float:
        return self.compute_seconds + self.overhead_seconds + self.stall_seconds

    @property
    def offloaded_fraction(self) -> float:
        """The fraction of the saved-activation bytes that is offloaded."""
        offloaded = sum(d.nbytes for d in saved_activations(self.decisions) if d.offload)
        return offloaded / self.activation_bytes if self.activation_bytes else 0.0


@dataclasses.dataclass(frozen=True)
class DriveWear:
    """Drive wear at one policy's write rate: the drive that takes the most bytes wears first."""

    bytes_per_hour: float
    """All drives together."""
    days: float
    """Until the first drive has written its rated terabytes; ``inf`` if nothing is written."""


def drive_wear(
    bytes_per_step: int, step_seconds: float, tbw: float, shares: Sequence[float] = (1.0,)
) -> DriveWear:
    """Wear for ``bytes_per_step`` written every ``step_seconds``, spread over drives in
    ``shares`` (fractions summing to 1), each rated for ``tbw`` terabytes (10**12 bytes)."""
    per_hour = bytes_per_step * 3600 / step_seconds
    worst = max(shares) * per_hour * 24
    return DriveWear(per_hour, tbw * 1e12 / worst if worst else math.inf)


@dataclasses.dataclass(frozen=True)
class Simulation:
    """Every policy's prediction on one machine; printing it shows them and the adaptive plan."""

    hardware: Hardware
    costs: DeviceCosts
    predictions: dict[str, Prediction]
    tbw: float | None = None
    """The drives' endurance rating in terabytes written, for the wear column."""

    def wear(self, name: str, tbw: float) -> DriveWear:
        p = self.predictions[name]
        return drive_wear(p.bytes_written, p.step_seconds, tbw, self.hardware.write_shares())

    def __str__(self) -> str:
        c = self.costs
        lines = [
            f"simulated on {self.hardware.name}: {c.flops_per_s / 1e12:.3g} TFLOP/s"
            + (f" ({c.flops_per_s_16bit / 1e12:.3g} in 16 bits)" if c.flops_per_s_16bit else "")
            + f", memory {c.memory_bytes_per_s / 1e9:.4g} GB/s, drives write "
            f"{c.write_bytes_per_s / 1e9:.4g} GB/s and read {c.read_bytes_per_s / 1e9:.4g} GB/s "
            f"({_count(len(self.hardware.disk_write_bytes_per_s), 'drive')})",
            "",
        ]
        header = ["policy", "resident MiB", "offloaded", "step ms", "compute ms"]
        header += ["overhead ms", "stall ms", "written MiB/step"]
        if self.tbw is not None:
            header += ["GB/hour", f"days to {self.tbw:g} TBW"]
        rows = []
        for name, p in self.predictions.items():
            row = [name, f"{p.resident_bytes / 2**20:.1f}", f"{p.offloaded_fraction:.0%}"]
            row += [f"{s * 1e3:.2f}" for s in (p.step_seconds, p.compute_seconds)]
            row += [f"{s * 1e3:.2f}" for s in (p.overhead_seconds, p.stall_seconds)]
            row.append(f"{p.bytes_written / 2**20:.1f}")
            if self.tbw is not None:
                wear = self.wear(name, self.tbw)
                row += [f"{wear.bytes_per_hour / 1e9:.1f}", f"{wear.days:.0f}"]
            rows.append(row)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        for p in self.predictions.values():
            lines.extend(p.notes)
        if "adaptive" in self.predictions:
            plan = format_decisions(self.predictions["adaptive"].decisions)
            lines += ["", "adaptive plan:", plan]
        return "\n".join(lines)


def simulate(
    model: torch.nn.Module,
    *args: Any,
    hardware: Hardware,
    options: Mapping[str, Any] | None = None,
    policies: Sequence[str] = POLICIES,
    budgets: Sequence[float] = BUDGETS,
    tbw: float | None = None,
    **kwargs: Any,
) -> Simulation:
    """Plan ``model(*args, **kwargs)`` for ``hardware`` and predict each policy's step.

    ``policies`` among ``"none"``, ``"adaptive"``, ``"all"`` and ``"recompute"`` (full
    recomputation: PyTorch's min-cut partitioner at ``activation_memory_budget=0``,
    nothing offloaded); then ``"memory_budget=b"`` (adaptive) for each ``b`` in
    ``budgets``. ``options`` are the backend's (``min_bytes``, ``io_safety``...); the
    rates come from ``hardware``, and ``compiler`` is ``aot_eager`` (nothing runs).
    """
    given = dict(options or {})
    for key in ("policy", "memory_budget", "compiler", "cost_model", *RATES):
        if key in given:
            raise ValueError(f"fxoffload.simulate sets {key!r} itself; give rates in hardware")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    base = Options.from_dict({**given, "compiler": "aot_eager", "cost_model": "flops"})
    costs = hardware.device_costs()
    graphs = _trace(model, args, kwargs)
    plans = {
        name: (
            dataclasses.replace(base, policy="none" if name == "recompute" else name),
            0.0 if name == "recompute" else None,
        )
        for name in policies
    }
    for b in budgets:
        plans[f"memory_budget={b:g}"] = (
            dataclasses.replace(base, policy="adaptive", memory_budget=b),
            None,
        )
    predictions = {
        name: _predict(name, graphs, opts, costs, pytorch_budget)
        for name, (opts, pytorch_budget) in plans.items()
    }
    return Simulation(hardware, costs, predictions, tbw)


def _trace(
    model: torch.nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> list[tuple[fx.GraphModule, list[Any]]]:
    """Dynamo's graphs of the model, each with its example inputs."""
    graphs: list[tuple[fx.GraphModule, list[Any]]] = []

    def capture(gm: fx.GraphModule, example_inputs: list[Any]):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    compile_once(model, args, kwargs, capture)
    if not graphs:
        raise RuntimeError("fxoffload.simulate: Dynamo compiled no graph of this model")
    return graphs


def _predict(
    name: str,
    graphs: list[tuple[fx.GraphModule, list[Any]]],
    options: Options,
    costs: DeviceCosts,
    pytorch_budget: float | None,
) -> Prediction:
    found: list[PartitionResult] = []
    budget = functorch_config.activation_memory_budget if pytorch_budget is None else pytorch_budget
    with functorch_config.patch(activation_memory_budget=budget, enable_autograd_cache=False):
        for gm, example_inputs in graphs:
            with FakeTensorMode(shape_env=ShapeEnv()):
                inputs = [_on_cpu(x) for x in example_inputs]
            compile_with_offloading(
                _graph_on_cpu(gm), inputs, options, on_partition=found.append, costs=costs
            )
    if not found:
        raise RuntimeError(
            "fxoffload.simulate: no graph needs backward, so nothing was planned. "
            "Does any parameter or input require grad?"
        )
    totals = [0.0, 0.0, 0.0]
    resident = written = 0
    for result in found:
        assert result.fw_gm is not None and result.bw_gm is not None
        resident += resident_bytes(result.fw_gm, result.bw_gm, result.decisions, costs, options)
        for i, seconds in enumerate(_run(result.fw_gm, result.bw_gm, costs, options)):
            totals[i] += seconds
        stores = result.fw_gm.graph.find_nodes(op="call_function", target=ops.store)
        written += sum(_stored_bytes(s) for s in stores)
    decisions = [d for r in found for d in r.decisions]
    return Prediction(
        name,
        decisions,
        activation_bytes=sum(d.nbytes for d in saved_activations(decisions)),
        resident_bytes=resident,
        compute_seconds=totals[0],
        overhead_seconds=totals[1],
        stall_seconds=totals[2],
        bytes_written=written,
        notes=tuple(r.budget_note for r in found if r.budget_note is not None),
    )


def _run(
    fw_gm: fx.GraphModule, bw_gm: fx.GraphModule, costs: DeviceCosts, options: Options
) -> tuple[float, float, float]:
    """(compute, offloading overhead, stall) seconds of forward then backward on one clock."""
    clock = compute = overhead = stall = 0.0
    drives_free = 0.0  # when the drives' queue has done everything queued so far
    written: dict[str, float] = {}  # stored value -> when its write ends
    in_flight: list[tuple[float, int]] = []  # (end, bytes) of writes not yet done
    for node in fw_gm.graph.nodes:
        if node.target is ops.store:
            nbytes = _stored_bytes(node)
            in_flight = sorted((end, b) for end, b in in_flight if end > clock)
            while in_flight and sum(b for _, b in in_flight) + nbytes > options.max_inflight_bytes:
                end, _ = in_flight.pop(0)
                overhead += end - clock
                clock = end
            copy = costs.offload_overhead(nbytes)
            overhead += copy
            clock += copy
            drives_free = max(clock, drives_free) + costs.write_time(nbytes)
            written[node.meta[META_KEY].name] = drives_free
            in_flight.append((drives_free, nbytes))
        else:
            seconds = node_time(node, costs)
            compute += seconds
            clock += seconds
    ready: dict[str, float] = {}  # stored value -> when backward can have it
    for node in bw_gm.graph.nodes:
        if node.target is ops.prefetch:
            record = node.args[0].meta[META_KEY]
            if written[record.name] > clock:  # still in memory: handed over, not read
                ready[record.name] = clock
            else:
                drives_free = max(clock, drives_free) + costs.read_time(record.nbytes)
                ready[record.name] = drives_free
        elif node.target is ops.wait:
            end = ready[node.args[0].meta[META_KEY].name]
            if end > clock:
                stall += end - clock
                clock = end
        else:
            seconds = node_time(node, costs)
            compute += seconds
            clock += seconds
    return compute, overhead, stall


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _stored_bytes(store: fx.Node) -> int:
    return tensor_nbytes(store.args[0].meta["val"])


def _on_cpu(x: Any) -> Any:
    """A fake CPU tensor like ``x`` (same sizes, strides, dtype, requires_grad); others as is."""
    if not isinstance(x, torch.Tensor):
        return x
    fake = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device="cpu")
    return fake.requires_grad_(x.requires_grad)


def _graph_on_cpu(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose nodes make their tensors on the CPU (``arange(..., device=d)``).

    It keeps what AOTAutograd reads from a Dynamo graph to tell parameters from other
    inputs (``meta``, ``_param_name_to_source``, each placeholder's ``_dynamo_source``):
    without it, parameters would not be static inputs and the partition would differ.
    """
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    for node in graph.nodes:
        node.args, node.kwargs = fx.node.map_aggregate((node.args, node.kwargs), _device_on_cpu)
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    for node in gm.graph.find_nodes(op="placeholder"):
        if hasattr(node, "_dynamo_source"):
            copies[node]._dynamo_source = node._dynamo_source
    return copy


def _device_on_cpu(arg: Any) -> Any:
    return torch.device("cpu") if isinstance(arg, torch.device) else arg
