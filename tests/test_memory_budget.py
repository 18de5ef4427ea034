"""``memory_budget``: keep, offload or recompute each saved value, from one budget.

The rates are given (``KNOWN_RATES``, and a disk slow enough that offloading
alone cannot meet a low budget), so the decisions depend on the graphs only.
"""

from __future__ import annotations

import copy
import re
import tempfile

import expecttest
import pytest
import torch
from test_planner import LayerStack
from test_planner import options as planner_options
from training_runs import CountingBackend, losses_and_grads, reproducible

import fxoffload
from fxoffload.passes import SavedKind

pytestmark = pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled:UserWarning")

SLOW_DISK = {"write_bytes_per_s": 1e7, "read_bytes_per_s": 1e7}
"""Hides the first layers' activations only: a budget below that needs recomputation."""


def options(directory: str, **overrides: object) -> dict:
    return planner_options(directory, **{**SLOW_DISK, **overrides})


def resident_bytes(e: fxoffload.Explanation) -> int:
    """What the plan keeps in memory at the start of backward, staging buffers included
    (with no budget: the saved activations it keeps)."""
    (graph,) = e.graphs
    if graph.budget_note is None:
        return sum(
            d.nbytes
            for d in graph.decisions
            if d.kind is SavedKind.ACTIVATION and d.is_saved and not d.offload
        )
    return int(re.search(r"the plan keeps (\d+)", graph.budget_note)[1])


def explain(directory: str, budget: float, **overrides: object) -> fxoffload.Explanation:
    torch.manual_seed(0)
    opts = options(directory, memory_budget=budget, **overrides)
    return fxoffload.explain(LayerStack(6), torch.randn(64, 256), options=opts)


class TestDecisions(expecttest.TestCase):
    def setUp(self) -> None:
        self._dir = tempfile.TemporaryDirectory()
        self.tmp = self._dir.name

    def tearDown(self) -> None:
        self._dir.cleanup()

    def test_golden_keep_offload_recompute(self) -> None:
        # The disk hides four values; a half budget needs two more gone, and PyTorch's
        # partition at 0.9 recomputes the cheap GELUs (their inputs, the matmuls, are saved).
        table = str(explain(self.tmp, 0.5)).split("forward:")[0]
        self.assertExpectedInline(
            "\n".join(line for line in table.splitlines() if not line.startswith("primals")),
            """\
graph 0: 12 saved values, 3 offloaded (196608 bytes written), 9 kept, 5 recomputed
memory_budget=0.5: at most 360448 of 720896 saved-activation bytes in memory at the start of backward; the plan keeps 327680, staging buffers included, and 1644544 with backward's own tensors at its modelled peak; it offloads 3 stores and recomputes 5 values (PyTorch's partition at activation_memory_budget=0.9); modelled step 152.78 ms, +0.52 ms against budget 1.0 with the same offloading policy
name        shape       dtype    bytes   decision   reason
addmm       [64, 256]   float32  65536   offload    hidden: written 35.33 ms before forward ends, read from 70.98 ms into backward, 0.0 us before first use; costs 131.1 us
addmm_1     [64, 256]   float32  65536   offload    hidden: written 25.50 ms before forward ends, read from 53.02 ms into backward, 0.0 us before first use; costs 131.1 us
addmm_2     [64, 256]   float32  65536   offload    hidden: written 15.67 ms before forward ends, read from 35.06 ms into backward, 0.0 us before first use; costs 131.1 us
addmm_3     [64, 256]   float32  65536   keep       not needed: memory_budget is met by the 3 stores made before it
addmm_4     [64, 256]   float32  65536   keep       write would end 3.86 ms after forward
addmm_5     [64, 256]   float32  65536   keep       write would end 9.63 ms after forward
gelu        [64, 256]   float32  65536   recompute  recomputed in backward by PyTorch's partitioner at activation_memory_budget=0.9
gelu_1      [64, 256]   float32  65536   recompute  recomputed in backward by PyTorch's partitioner at activation_memory_budget=0.9
gelu_2      [64, 256]   float32  65536   recompute  recomputed in backward by PyTorch's partitioner at activation_memory_budget=0.9
gelu_3      [64, 256]   float32  65536   recompute  recomputed in backward by PyTorch's partitioner at activation_memory_budget=0.9
gelu_4      [64, 256]   float32  65536   recompute  recomputed in backward by PyTorch's partitioner at activation_memory_budget=0.9""",
        )

    def test_no_budget_recomputes_nothing(self) -> None:
        e = explain(self.tmp, 1.0)
        self.assertFalse(any(d.kind is SavedKind.RECOMPUTED for d in e.decisions))
        self.assertIsNone(e.graphs[0].budget_note)

    def test_resident_bytes_never_rise_as_the_budget_falls(self) -> None:
        sweep = [1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0]
        resident = [resident_bytes(explain(self.tmp, b)) for b in sweep]
        self.assertEqual(resident, sorted(resident, reverse=True), resident)
        self.assertEqual(resident[-1], 0)
        total = 11 * 64 * 256 * 4  # the six layers' matmul and GELU outputs but the last GELU
        for budget, kept in zip(sweep, resident, strict=True):
            self.assertLessEqual(kept, budget * total, (budget, resident))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_offloading_under_a_budget_changes_no_bit(compiler: str, tmp_path) -> None:
    """The plan against the same recomputation with nothing offloaded: PyTorch's own
    budget at the value the plan chose, policy "none". Under aot_eager recomputation
    reruns the same kernels, so the plan also equals "none" with no budget."""
    torch.manual_seed(0)
    model = LayerStack(6)
    batches = [torch.randn(64, 256) for _ in range(2)]
    chosen = explain(str(tmp_path), 0.5, compiler=compiler)
    (graph,) = chosen.graphs
    pytorch_budget = float(graph.budget_note.split("activation_memory_budget=")[1].split(")")[0])
    assert 0 < pytorch_budget < 1 and any(d.offload for d in graph.decisions)

    def train(policy: str, **overrides: object) -> list[torch.Tensor]:
        torch._dynamo.reset()
        m = copy.deepcopy(model)
        opts = options(str(tmp_path), policy=policy, compiler=compiler, **overrides)
        return losses_and_grads(m, torch.compile(m, backend="ssdtrain", options=opts), batches)

    with reproducible(compiler):
        planned = train("adaptive", memory_budget=0.5)
        with torch._functorch.config.patch(activation_memory_budget=pytorch_budget):
            same_recomputation = train("none")
        no_budget = train("none")
    assert all(torch.equal(a, b) for a, b in zip(planned, same_recomputation, strict=True))
    if compiler == "aot_eager":
        assert all(torch.equal(a, b) for a, b in zip(planned, no_budget, strict=True))


def test_a_budget_under_dynamic_shapes_compiles_once(tmp_path) -> None:
    """Two batch sizes, one compile: every partition of the budget's grid is symbolic."""
    torch.manual_seed(0)
    model = LayerStack(4)
    batches = [torch.randn(rows, 256) for rows in (64, 96, 64)]
    results = {}
    for name, overrides in (("none", {"policy": "none"}), ("budget", {"memory_budget": 0.3})):
        torch._dynamo.reset()
        m = copy.deepcopy(model)
        backend = CountingBackend(options(str(tmp_path), **overrides))
        compiled = torch.compile(m, backend=backend, dynamic=True)
        results[name] = losses_and_grads(m, compiled, batches)
        assert backend.compiles == 1
    assert all(torch.equal(a, b) for a, b in zip(*results.values(), strict=True))


def test_options_reject_a_budget_out_of_range_or_without_offloading() -> None:
    with pytest.raises(ValueError, match="'memory_budget' must be <= 1; got 1.5"):
        fxoffload.Options(memory_budget=1.5)
    with pytest.raises(ValueError, match="'memory_budget' needs policy 'adaptive' or 'all'"):
        fxoffload.Options(memory_budget=0.5, policy="none")
