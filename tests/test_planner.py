"""The adaptive planner and the prefetch placement, on toy models with known costs.

The device rates are given as options (``KNOWN_RATES``), so decisions depend
on the graphs alone, not on this machine; one test checks the measured rates
instead, on the real disk.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import random
import tempfile

import expecttest
import pytest
import torch
import torch.fx as fx
from known_rates import KNOWN_RATES
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop
from torch.fx.experimental.proxy_tensor import make_fx
from training_runs import CountingBackend, losses_and_grads, reproducible

import fxoffload
from fxoffload import ops, profiling
from fxoffload.backend import compile_with_offloading, device_costs
from fxoffload.options import Options
from fxoffload.partitioner import OffloadPartitioner
from fxoffload.passes import META_KEY, SavedKind, SavedValue
from fxoffload.passes.costs import MEASURED_SECONDS, DeviceCosts, node_time, start_times
from fxoffload.passes.plan import Transfer, plan_adaptive
from fxoffload.passes.timeline import Read, ReadQueue, latest_starts
from fxoffload.runtime import Engine, EngineConfig, engine_for, probe

pytestmark = pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled:UserWarning")


class LayerStack(torch.nn.Module):
    """Linear + GELU layers: each saves its matmul output and its GELU output."""

    def __init__(self, layers: int = 4, width: int = 256) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            *[
                torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU())
                for _ in range(layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).sum()


class Conv1DStack(torch.nn.Module):
    """GPT-2's ``Conv1D``: ``addmm`` with a weight of shape (in, out). Backward needs each
    layer's input transposed for the weight gradient; the partitioner saves that
    transpose, a view of an activation made early, and puts it at the end of forward."""

    def __init__(self, layers: int = 4, width: int = 256) -> None:
        super().__init__()
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(width, width) * 0.02) for _ in range(layers)
        )
        self.biases = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(width)) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w, b in zip(self.weights, self.biases, strict=True):
            h = torch.addmm(b, x.view(-1, x.size(-1)), w)
            x = torch.nn.functional.gelu(h.view(x.shape))
        return x.sum()


def options(directory: str, **overrides: object) -> dict:
    return {
        "compiler": "aot_eager",
        "policy": "adaptive",
        "min_bytes": 0,
        "offload_dir": directory,
        **KNOWN_RATES,
        **overrides,
    }


def activations(e: fxoffload.Explanation) -> list[SavedValue]:
    """The candidates, in the order forward makes them (the saved-slot order)."""
    return [d for d in e.decisions if d.kind is SavedKind.ACTIVATION]


class TestAdaptiveDecisions(expecttest.TestCase):
    def setUp(self) -> None:
        torch.manual_seed(0)
        self.dir = tempfile.TemporaryDirectory()

    def tearDown(self) -> None:
        self.dir.cleanup()

    def explain(self, model: torch.nn.Module, x: torch.Tensor, **overrides: object):
        return fxoffload.explain(model, x, options=options(self.dir.name, **overrides))

    def table(self, e: fxoffload.Explanation) -> str:
        return str(e).split("forward:")[0]

    def test_golden_decisions(self) -> None:
        # 64x256 float32 activations: 64 KiB, 0.98 ms to write at 1e8 B/s with the
        # 1.5 safety factor; each layer's matmul is 8.4 MFLOP, 8.4 ms at 1e9.
        e = self.explain(LayerStack(), torch.randn(64, 256))
        self.assertExpectedInline(
            self.table(e),
            """\
graph 0: 11 saved values, 6 offloaded (393216 bytes written), 5 kept
name       shape       dtype    bytes   decision  reason
primals_3  [64, 256]   float32  65536   keep      forward input: the caller holds it
primals_4  [256, 256]  float32  262144  keep      parameter or buffer: lives for the whole run
primals_6  [256, 256]  float32  262144  keep      parameter or buffer: lives for the whole run
primals_8  [256, 256]  float32  262144  keep      parameter or buffer: lives for the whole run
addmm      [64, 256]   float32  65536   offload   hidden: written 26.61 ms before forward ends, read from 52.50 ms into backward, 0.0 us before first use; costs 131.1 us
gelu       [64, 256]   float32  65536   offload   hidden: written 25.63 ms before forward ends, read from 43.65 ms into backward, 0.0 us before first use; costs 131.1 us
addmm_1    [64, 256]   float32  65536   offload   hidden: written 17.43 ms before forward ends, read from 34.67 ms into backward, 0.0 us before first use; costs 131.1 us
gelu_1     [64, 256]   float32  65536   offload   hidden: written 16.45 ms before forward ends, read from 25.82 ms into backward, 0.0 us before first use; costs 131.1 us
addmm_2    [64, 256]   float32  65536   offload   hidden: written 8.26 ms before forward ends, read from 16.84 ms into backward, 0.0 us before first use; costs 131.1 us
gelu_2     [64, 256]   float32  65536   offload   hidden: written 7.28 ms before forward ends, read from 8.00 ms into backward, 0.0 us before first use; costs 131.1 us
addmm_3    [64, 256]   float32  65536   keep      write would end 786.4 us after forward
""",
        )

    def test_late_views_are_timed_from_their_early_bases(self) -> None:
        # t_1, t_3, t_5 sit at the end of forward; their bases are the layers' GELU
        # outputs. Timed at the view node, each write "would end after forward".
        e = self.explain(Conv1DStack(), torch.randn(4, 16, 256))
        self.assertExpectedInline(
            self.table(e),
            """\
graph 0: 14 saved values, 9 offloaded (393216 bytes written), 5 kept
name       shape         dtype    bytes   decision  reason
primals_4  [256, 256]    float32  262144  keep      parameter or buffer: lives for the whole run
primals_6  [256, 256]    float32  262144  keep      parameter or buffer: lives for the whole run
primals_8  [256, 256]    float32  262144  keep      parameter or buffer: lives for the whole run
addmm      [64, 256]     float32  65536   offload   hidden: written 26.61 ms before forward ends, read from 52.50 ms into backward, 0.0 us before first use; costs 131.1 us
addmm_1    [64, 256]     float32  65536   offload   hidden: written 17.43 ms before forward ends, read from 34.67 ms into backward, 0.0 us before first use; costs 131.1 us
addmm_2    [64, 256]     float32  65536   offload   hidden: written 8.26 ms before forward ends, read from 16.84 ms into backward, 0.0 us before first use; costs 131.1 us
addmm_3    [64, 256]     float32  65536   keep      write would end 786.4 us after forward
t_1        [256, 64]     float32  65536   offload   view of gelu_2, rebuilt from it
t_3        [256, 64]     float32  65536   offload   view of gelu_1, rebuilt from it
t_5        [256, 64]     float32  65536   offload   view of gelu, rebuilt from it
t_6        [256, 64]     float32  65536   keep      view of forward input primals_3
gelu_2     [4, 16, 256]  float32  65536   offload   not saved, but stored once for its saved views t_1; hidden: written 7.28 ms before forward ends, read from 8.00 ms into backward, 0.0 us before first use; costs 131.1 us
gelu_1     [4, 16, 256]  float32  65536   offload   not saved, but stored once for its saved views t_3; hidden: written 16.45 ms before forward ends, read from 25.82 ms into backward, 0.0 us before first use; costs 131.1 us
gelu       [4, 16, 256]  float32  65536   offload   not saved, but stored once for its saved views t_5; hidden: written 25.63 ms before forward ends, read from 43.65 ms into backward, 0.0 us before first use; costs 131.1 us
""",
        )

    def test_keeps_the_last_layers_when_the_disk_is_slow(self) -> None:
        # A tenth of the bandwidth: only the first layers have time to be written.
        slow = {"write_bytes_per_s": 1e7, "read_bytes_per_s": 1e7}
        decisions = activations(self.explain(LayerStack(6), torch.randn(64, 256), **slow))
        offloaded = [d.offload for d in decisions]
        self.assertTrue(any(offloaded) and not all(offloaded), offloaded)
        # What is offloaded is a prefix, in production order: the last layers stay.
        first_kept = offloaded.index(False)
        self.assertEqual(offloaded, [True] * first_kept + [False] * (len(offloaded) - first_kept))
        for d in decisions[first_kept:]:
            self.assertRegex(d.reason, "after forward|after first use")

    def test_fast_disk_offloads_all_but_the_last(self) -> None:
        fast = {"write_bytes_per_s": 1e12, "read_bytes_per_s": 1e12}
        decisions = activations(self.explain(LayerStack(6), torch.randn(64, 256), **fast))
        # The last layer's matmul output is made at the very end of forward (only
        # the GELU, the sum and nothing else follow it): even a fast write cannot
        # finish before forward does.
        self.assertEqual([d.offload for d in decisions], [True] * (len(decisions) - 1) + [False])

    def test_read_that_cannot_be_hidden_is_kept(self) -> None:
        # Writes are free, reads slow: backward's first layers have no time to read.
        rates = {"write_bytes_per_s": 1e12, "read_bytes_per_s": 2e7}
        decisions = activations(self.explain(LayerStack(6), torch.randn(64, 256), **rates))
        kept = [d for d in decisions if not d.offload]
        self.assertTrue(any("after first use in backward" in d.reason for d in kept), kept)
        self.assertTrue(any(d.offload for d in decisions))

    def test_value_larger_than_prefetch_budget_is_kept(self) -> None:
        decisions = activations(
            self.explain(LayerStack(), torch.randn(64, 256), prefetch_budget_bytes=1000)
        )
        self.assertTrue(all(not d.offload for d in decisions))
        self.assertIn("prefetch_budget_bytes=1000", decisions[0].reason)

    def test_offloads_less_where_offloading_costs_more_step_time(self) -> None:
        # Each 64 KiB store's copy into staging costs 131 us at 1 GB/s of memory
        # bandwidth; a modelled step of about 100 ms at max_overhead=0.005 pays for three.
        decisions = activations(
            self.explain(LayerStack(), torch.randn(64, 256), max_overhead=0.005)
        )
        self.assertEqual([d.offload for d in decisions], [True] * 3 + [False] * 4)
        for d in decisions[3:6]:
            self.assertRegex(d.reason, r"^its copy and I/O would cost 131.1 us of step time; ")


def test_16bit_matmuls_are_costed_at_the_16bit_rate() -> None:
    a = torch.randn(64, 64, dtype=torch.bfloat16)
    gm = make_fx(lambda a: (torch.mm(a, a), torch.mm(a.float(), a.float())))(a)
    rates = {"memory_bytes_per_s": 1e30, "write_bytes_per_s": 1.0, "read_bytes_per_s": 1.0}
    costs = DeviceCosts(flops_per_s=1e9, flops_per_s_16bit=1e10, **rates)
    half, single = (
        node_time(n, costs) for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default
    )
    flops = 2 * 64**3
    assert half == pytest.approx(flops / 1e10) and single == pytest.approx(flops / 1e9)
    # Without a 16-bit rate (flops_per_s given as an option), one rate for every dtype.
    same = DeviceCosts(flops_per_s=1e9, **rates)
    assert [
        node_time(n, same) for n in gm.graph.nodes if n.target is torch.ops.aten.mm.default
    ] == [pytest.approx(flops / 1e9)] * 2


class TestProfile:
    def test_every_call_is_timed_and_the_times_replace_the_model(self) -> None:
        gm = make_fx(lambda a: torch.mm(a, a).relu().sum(), tracing_mode="fake")(
            torch.randn(256, 256)
        )
        profiling.profile(gm)
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        assert len(calls) == 3
        assert all(n.meta[MEASURED_SECONDS] > 0 for n in calls)
        costs = DeviceCosts(**{k: 1.0 for k in KNOWN_RATES})  # the model would say hours
        assert [node_time(n, costs) for n in calls] == [n.meta[MEASURED_SECONDS] for n in calls]

    def test_a_graph_that_cannot_run_on_random_inputs_keeps_the_model(self) -> None:
        def checks_its_input(x: torch.Tensor) -> torch.Tensor:
            torch._assert_async(x.sum() > 1e9)  # false for random inputs
            return x.relu()

        gm = make_fx(checks_its_input, tracing_mode="fake")(torch.randn(8))
        with pytest.warns(RuntimeWarning, match=r"could not profile .*_assert_async"):
            profiling.profile(gm)
        assert not any(MEASURED_SECONDS in n.meta for n in gm.graph.nodes)

    def test_a_budget_plans_every_partition_with_one_profile_of_the_joint_graph(
        self, tmp_path
    ) -> None:
        slow_disk = {"write_bytes_per_s": 1e7, "read_bytes_per_s": 1e7}  # budget 0: recompute
        opts = Options(
            **options(str(tmp_path), cost_model="profile", memory_budget=0.0, **slow_disk)
        )
        engine = engine_for(opts.offload_dir, EngineConfig(**opts.io_settings))
        partitioner = OffloadPartitioner(opts, device_costs(opts, engine, torch.device("cpu")))
        graphs: list[fx.GraphModule] = []

        def capture(gm: fx.GraphModule, example_inputs):
            graphs.append(gm)
            return boxed_nop(gm, example_inputs)

        backend = aot_autograd(fw_compiler=capture, bw_compiler=capture, partition_fn=partitioner)
        torch.compile(LayerStack(6), backend=backend)(torch.randn(64, 256)).backward()
        fw, bw = graphs
        times = {}
        for n in [*fw.graph.nodes, *bw.graph.nodes]:
            if n.op == "call_function" and n.target.namespace == "aten":
                times.setdefault(n.name, set()).add(n.meta[MEASURED_SECONDS])
        # A GELU recomputed in backward has the one time the joint graph's run measured.
        recomputed = [n.name for n in bw.graph.nodes if n.target is torch.ops.aten.gelu.default]
        assert recomputed and all(len(times[name]) == 1 for name in recomputed)

    @pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
    def test_profiled_adaptive_training_is_bitwise_equal_to_none(self, compiler, tmp_path) -> None:
        torch.manual_seed(0)
        model = LayerStack(6)
        xs = [torch.randn(64, 256) for _ in range(2)]
        runs = {}
        found: list = []
        with reproducible(compiler):
            for policy in ("none", "adaptive"):
                torch._dynamo.reset()
                m = copy.deepcopy(model)
                opts = Options(
                    **options(str(tmp_path), policy=policy, compiler=compiler, cost_model="profile")
                )
                backend = functools.partial(
                    compile_with_offloading, options=opts, on_partition=found.append
                )
                runs[policy] = losses_and_grads(m, torch.compile(m, backend=backend), xs)
        assert all(torch.equal(a, b) for a, b in zip(runs["none"], runs["adaptive"], strict=True))
        # The last partition is adaptive's: each activation's reason gives its margins.
        reasons = [d.reason for d in found[-1].decisions if d.kind is SavedKind.ACTIVATION]
        assert reasons and all(
            r.startswith(("hidden", "write would end", "its read", "reading it")) for r in reasons
        ), reasons


def backward_graph(
    model: torch.nn.Module, x: torch.Tensor, opts: Options
) -> tuple[fx.GraphModule, DeviceCosts]:
    """Compile ``model`` with our partitioner and return the backward graph it made."""
    engine = engine_for(opts.offload_dir, EngineConfig(**opts.io_settings))
    costs = device_costs(opts, engine, x.device)
    graphs: list[fx.GraphModule] = []

    def capture(gm: fx.GraphModule, example_inputs):
        graphs.append(gm)
        return boxed_nop(gm, example_inputs)

    backend = aot_autograd(
        fw_compiler=boxed_nop, bw_compiler=capture, partition_fn=OffloadPartitioner(opts, costs)
    )
    torch.compile(model, backend=backend)(x).backward()
    return graphs[-1], costs


class TestPrefetchPlacement:
    def reads(self, bw: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
        """(prefetch, wait) pairs, in graph order."""
        return [(w.args[1], w) for w in bw.graph.nodes if w.target is ops.wait]

    def test_reads_are_issued_by_the_modelled_margin(self, tmp_path) -> None:
        opts = Options(**options(str(tmp_path), policy="all"))
        bw, costs = backward_graph(LayerStack(6), torch.randn(64, 256), opts)
        starts = start_times(bw.graph, costs)
        order = {n: i for i, n in enumerate(bw.graph.nodes)}
        pairs = self.reads(bw)
        assert len(pairs) >= 10
        # In the order backward needs them.
        assert [order[p] for p, _ in pairs] == sorted(order[p] for p, _ in pairs)
        disk_free = 0.0
        for prefetch, wait in pairs:
            read = opts.io_safety * costs.read_time(wait.args[0].meta[META_KEY].nbytes)
            margin = starts[wait] - starts[prefetch]
            # Each read ends before its wait, by the model, one read at a time...
            disk_free = max(disk_free, starts[prefetch]) + read
            if starts[prefetch] > 0:
                assert disk_free <= starts[wait] + 1e-12, prefetch.name
            if starts[prefetch] > 0:  # at 0: cannot be hidden, issued first thing
                assert margin >= read, prefetch.name
        assert any(starts[p] > 0 for p, _ in pairs), "every read hoisted to the start"

    def test_prefetch_budget_bounds_the_bytes_read_ahead(self, tmp_path) -> None:
        budget = 3 * 64 * 256 * 4  # three activations
        # A slow disk makes every read want to start at the beginning of backward.
        opts = Options(
            **options(
                str(tmp_path), policy="all", prefetch_budget_bytes=budget, read_bytes_per_s=1e6
            )
        )
        bw, _ = backward_graph(LayerStack(6), torch.randn(64, 256), opts)
        ahead, peak = 0, 0
        for node in bw.graph.nodes:
            if node.target is ops.prefetch:
                ahead += node.args[0].meta[META_KEY].nbytes
                peak = max(peak, ahead)
            elif node.target is ops.wait:
                ahead -= node.args[0].meta[META_KEY].nbytes
        assert peak == budget


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_adaptive_training_is_bitwise_equal_to_none(compiler: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = LayerStack(6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(64, 256) for _ in range(3)]
    results = {}
    with reproducible(compiler):
        for policy in ("none", "adaptive"):
            model.load_state_dict(state)
            torch._dynamo.reset()
            fxoffload.reset_stats()
            slow = {"write_bytes_per_s": 1e7, "read_bytes_per_s": 1e7}
            opts = options(str(tmp_path), policy=policy, compiler=compiler, **slow)
            compiled = torch.compile(model, backend="ssdtrain", options=opts)
            results[policy] = (losses_and_grads(model, compiled, batches), fxoffload.stats())
    for a, b in zip(results["none"][0], results["adaptive"][0], strict=True):
        assert torch.equal(a, b)
    assert results["none"][1].tensors_stored == 0
    assert 0 < results["adaptive"][1].tensors_stored < 3 * 12  # some, not all, offloaded


def test_adaptive_dynamic_shapes_one_compile(tmp_path) -> None:
    """Two batch sizes, one compile: the plan uses the first sizes' hints, math stays exact."""
    torch.manual_seed(0)
    model = LayerStack(4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for policy in ("none", "adaptive"):
        model.load_state_dict(state)
        torch._dynamo.reset()
        backend = CountingBackend(options(str(tmp_path), policy=policy))
        compiled = torch.compile(model, backend=backend, dynamic=True)
        batches = [
            torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
            for rows in (64, 96)
        ]
        results[policy] = losses_and_grads(model, compiled, batches)
        assert backend.compiles == 1
    for a, b in zip(results["none"], results["adaptive"], strict=True):
        assert torch.equal(a, b)


def test_measured_rates_are_cached_per_user_and_file_system(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FXOFFLOAD_CACHE_DIR", str(tmp_path / "cache"))
    offload_dir = tmp_path / "offload"
    offload_dir.mkdir()
    engine = engine_for(str(offload_dir))
    write, read, io_compute = probe.disk_rates(engine.drives, engine.config)
    compute = probe.compute_rates(torch.device("cpu"))
    assert min(write, read, *compute) > 0
    assert 0 <= io_compute < 1e-6  # less than a second of compute lost per megabyte moved
    path = tmp_path / "cache" / probe.CACHE_NAME
    table = json.loads(path.read_text())
    assert sorted(k.split(":")[:2] for k in table) == [
        ["compute", "cpu"],
        ["disk", probe.file_system(str(offload_dir))],
    ]
    mtime = os.stat(path).st_mtime_ns
    # Measured once: a second ask (another process would too) reads the file.
    assert probe.disk_rates(engine.drives, engine.config) == (write, read, io_compute)
    assert probe.compute_rates(torch.device("cpu")) == compute
    assert os.stat(path).st_mtime_ns == mtime
    # Nothing is left in the offload dir but the engine's private directory.
    assert [p.name.split("-")[0] for p in offload_dir.iterdir()] == ["fxoffload"]


def test_the_disk_is_measured_again_for_another_chunk_size(tmp_path, monkeypatch) -> None:
    """The disk rates depend on the chunk size the engine moves, so it is in the cache key."""
    monkeypatch.setenv("FXOFFLOAD_CACHE_DIR", str(tmp_path / "cache"))
    for chunk_bytes in (1 << 20, 4 << 20):
        engine = Engine(str(tmp_path), EngineConfig(chunk_bytes=chunk_bytes))
        try:
            probe.disk_rates(engine.drives, engine.config)
        finally:
            engine.close()
    table = json.loads(open(probe.cache_path()).read())
    assert sorted(k.split(":")[4] for k in table if k.startswith("disk:")) == [
        str(1 << 20),
        str(4 << 20),
    ]


def test_read_queue_agrees_with_recomputing_the_whole_schedule() -> None:
    """The planner's O(log n) read checks against the schedule recomputed from scratch:
    the latest starts of every accepted read, the candidate included, all at or after
    the start of backward."""
    rng = random.Random(0)
    for _ in range(20):
        reads = [
            Read(f"r{i}", first_use=rng.uniform(0, 10), seconds=rng.uniform(0, 2), nbytes=1)
            for i in range(40)
        ]
        queue, accepted = ReadQueue(reads), []
        for read in rng.sample(reads, len(reads)):
            slack, _ = queue.slack_if_added(read)
            feasible = min(latest_starts([*accepted, read]).values()) >= 0
            assert (slack >= -1e-12) == feasible or abs(slack) < 1e-9
            if feasible:
                queue.add(read)
                accepted.append(read)
        assert accepted


def test_the_scheduler_reads_where_the_plan_did(tmp_path) -> None:
    """One timeline: each offloaded value's prefetch is issued no later than the read
    start the plan reported, and no earlier than the node before that start."""
    opts = Options(**options(str(tmp_path), write_bytes_per_s=1e9, read_bytes_per_s=2e8))
    bw, costs = backward_graph(LayerStack(6), torch.randn(64, 256), opts)
    starts = start_times(bw.graph, costs)
    nodes = list(bw.graph.nodes)
    planned = {}
    for n in bw.graph.find_nodes(op="placeholder"):
        record = n.meta.get(META_KEY)
        if record is not None and record.offload and record.reason.startswith("hidden"):
            planned[record.name] = float(record.reason.split("read from ")[1].split(" ms")[0])
    checked = 0
    for wait in (n for n in nodes if n.target is ops.wait):
        prefetch = wait.args[1]
        name = wait.args[0].meta[META_KEY].name
        issued = starts[nodes[nodes.index(prefetch) + 1]] * 1e3
        assert issued <= planned[name] + 1e-6, (name, issued, planned[name])
        checked += 1
    assert checked >= 4


def test_plans_with_the_settings_of_the_engine_it_runs_on(tmp_path) -> None:
    """A compile runs on, and plans with, the engine of its own I/O options, even where an
    engine with other settings was made on the directory before."""
    engine_for(str(tmp_path), EngineConfig())
    opts = options(str(tmp_path), max_inflight_bytes=100_000)
    e = fxoffload.explain(LayerStack(), torch.randn(64, 256), options=opts)
    waits = [d for d in activations(e) if "max_inflight_bytes=100000" in d.reason]
    assert waits, str(e)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_late_views_stored_through_their_bases_are_bitwise_equal_to_none(
    compiler: str, tmp_path
) -> None:
    """The golden twin of ``test_late_views_are_timed_from_their_early_bases``."""
    torch.manual_seed(0)
    model = Conv1DStack()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(4, 16, 256) for _ in range(2)]
    results = {}
    with reproducible(compiler):
        for policy in ("none", "adaptive"):
            model.load_state_dict(state)
            torch._dynamo.reset()
            opts = options(str(tmp_path), policy=policy, compiler=compiler)
            compiled = torch.compile(model, backend="ssdtrain", options=opts)
            results[policy] = losses_and_grads(model, compiled, batches)
    assert all(torch.equal(a, b) for a, b in zip(*results.values(), strict=True))


def test_overhead_left_by_stores_the_prefetch_budget_keeps_goes_to_others() -> None:
    """a and b are read ahead together, c alone, later; max_overhead pays for two stores and
    the prefetch budget holds one read ahead. b is kept for the budget; what it would have
    cost buys c."""
    mib = 1 << 20
    costs = DeviceCosts(
        flops_per_s=1e12,
        memory_bytes_per_s=1e12,
        write_bytes_per_s=1e9,
        read_bytes_per_s=1e9,
        copy_bytes_per_s=mib / 0.9e-3,  # each store's copy costs 0.9 ms of step time
    )
    transfers = [
        Transfer("a", mib, produced=0.000, first_use=0.004),
        Transfer("b", mib, produced=0.001, first_use=0.004),
        Transfer("c", mib, produced=0.002, first_use=0.015),
    ]
    options = Options(max_overhead=0.1, prefetch_budget_bytes=int(1.5 * mib), min_bytes=0)
    decisions = plan_adaptive(transfers, fw_end=0.010, step=0.020, costs=costs, options=options)
    assert {name for name, (offload, _) in decisions.items() if offload} == {"a", "c"}
    assert "prefetch_budget_bytes" in decisions["b"][1]
