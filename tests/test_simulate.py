"""``fxoffload.simulate``: the backend's own plan on given rates, and what it predicts.

Plans are compared with ``fxoffload.explain`` given the same rates as options:
the simulator must decide exactly what the backend decides, without an engine.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from known_rates import KNOWN_RATES
from test_cli import run_cli
from test_planner import Conv1DStack, LayerStack

import fxoffload
from fxoffload.hardware import PRESETS, Hardware, preset
from fxoffload.passes import SavedKind
from fxoffload.simulation import drive_wear

pytestmark = pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled:UserWarning")

SLOW_DISK = {"write_bytes_per_s": 1e7, "read_bytes_per_s": 1e7}
"""Hides the first layers' activations only, so adaptive both offloads and keeps."""


def known_hardware(write: float, read: float) -> Hardware:
    return Hardware(
        "known",
        flops_per_s=KNOWN_RATES["flops_per_s"],
        memory_bytes_per_s=KNOWN_RATES["memory_bytes_per_s"],
        disk_write_bytes_per_s=(write,),
        disk_read_bytes_per_s=(read,),
    )


def explained(model, x, tmp_path, **options) -> fxoffload.Explanation:
    opts = {"compiler": "aot_eager", "min_bytes": 0, "offload_dir": str(tmp_path), **options}
    return fxoffload.explain(model, x, options=opts)


class MetaAttention(torch.nn.Module):
    """One causal self-attention through ``scaled_dot_product_attention``, as a GPT block's."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()


@pytest.mark.parametrize("model_class", [LayerStack, Conv1DStack])
def test_plans_are_the_backends_on_the_same_rates(model_class, tmp_path) -> None:
    torch.manual_seed(0)
    model, x = model_class(6), torch.randn(64, 256)
    sim = simulate_known(model, x, budgets=(0.3,))
    rates = {**KNOWN_RATES, **SLOW_DISK}
    for name, options in {
        "adaptive": {"policy": "adaptive"},
        "all": {"policy": "all"},
        "memory_budget=0.3": {"policy": "adaptive", "memory_budget": 0.3},
    }.items():
        expected = explained(model, x, tmp_path, **rates, **options)
        assert sim.predictions[name].decisions == expected.decisions, name
        notes = [g.budget_note for g in expected.graphs if g.budget_note is not None]
        assert list(sim.predictions[name].notes) == notes
    adaptive = sim.predictions["adaptive"].decisions
    assert any(d.offload for d in adaptive) and any(
        not d.offload and d.kind is SavedKind.ACTIVATION for d in adaptive
    ), "the comparison needs a plan that both offloads and keeps"
    budgeted = sim.predictions["memory_budget=0.3"].decisions
    assert any(d.kind is SavedKind.RECOMPUTED for d in budgeted), "the budget must recompute"


def test_full_recomputation_is_pytorchs_budget_zero(tmp_path) -> None:
    torch.manual_seed(0)
    model, x = LayerStack(6), torch.randn(64, 256)
    sim = simulate_known(model, x, budgets=())
    with torch._functorch.config.patch(activation_memory_budget=0.0):
        expected = explained(model, x, tmp_path, policy="none")
    recompute, none = sim.predictions["recompute"], sim.predictions["none"]
    assert recompute.decisions == expected.decisions
    assert recompute.activation_bytes < none.activation_bytes
    assert recompute.compute_seconds > none.compute_seconds


def simulate_known(model, x, budgets, write=SLOW_DISK["write_bytes_per_s"], read=None):
    hardware = known_hardware(write, read or write)
    return fxoffload.simulate(
        model, x, hardware=hardware, options={"min_bytes": 0}, budgets=budgets
    )


def test_predicted_step_is_the_planners_modelled_step_when_nothing_stalls() -> None:
    """The replay of the rewritten graphs and memory_budget's own arithmetic agree."""
    torch.manual_seed(0)
    sim = simulate_known(LayerStack(6), torch.randn(64, 256), budgets=(0.5,))
    p = sim.predictions["memory_budget=0.5"]
    assert p.stall_seconds == 0 and p.bytes_written > 0
    (note,) = p.notes
    assert f"modelled step {p.step_seconds * 1e3:.2f} ms" in note
    assert f"the plan keeps {p.resident_bytes}," in note
    none = sim.predictions["none"]
    assert none.overhead_seconds == none.stall_seconds == none.bytes_written == 0
    assert none.resident_bytes == none.activation_bytes


def test_reads_slower_than_backward_stall_all_but_not_adaptive() -> None:
    torch.manual_seed(0)
    sim = simulate_known(LayerStack(6), torch.randn(64, 256), budgets=(), write=1e12, read=1e6)
    every = sim.predictions["all"]
    read_seconds = every.bytes_written / 1e6
    assert every.stall_seconds >= read_seconds - every.compute_seconds > 0
    assert math.isclose(
        every.step_seconds, every.compute_seconds + every.overhead_seconds + every.stall_seconds
    )
    assert sim.predictions["adaptive"].stall_seconds == 0


def test_drive_wear_arithmetic() -> None:
    # 1 GB a second is 3.6 TB an hour, 86.4 TB a day.
    wear = drive_wear(10**9, 1.0, tbw=86.4)
    assert wear.bytes_per_hour == 3.6e12 and math.isclose(wear.days, 1.0)
    assert math.isclose(drive_wear(2 * 10**9, 2.0, tbw=86.4, shares=(0.5, 0.5)).days, 2.0)
    assert drive_wear(0, 1.0, tbw=1.0).days == math.inf


def test_the_faster_drive_takes_more_bytes_and_wears_first() -> None:
    torch.manual_seed(0)
    hardware = Hardware(
        "two drives",
        flops_per_s=KNOWN_RATES["flops_per_s"],
        memory_bytes_per_s=KNOWN_RATES["memory_bytes_per_s"],
        disk_write_bytes_per_s=(3e7, 1e7),
    )
    sim = fxoffload.simulate(
        LayerStack(6),
        torch.randn(64, 256),
        hardware=hardware,
        options={"min_bytes": 0},
        budgets=(),
        tbw=100.0,
    )
    p = sim.predictions["all"]
    per_day = p.bytes_written / p.step_seconds * 86400
    assert math.isclose(sim.wear("all", 100.0).days, 100e12 / (0.75 * per_day))
    assert "days to 100 TBW" in str(sim)


def test_hardware_presets_overrides_and_pcie_cap() -> None:
    h100 = preset("h100", disk_write_bytes_per_s=(7e9,) * 8)
    assert h100.flops_per_s == PRESETS["h100"].flops_per_s == 989e12
    costs = h100.device_costs()
    assert costs.write_bytes_per_s == costs.read_bytes_per_s == 56e9  # under PCIe's 64
    assert costs.flops_per_s_16bit == 989e12 and costs.flops_per_s == 494.5e12
    assert preset("h100", disk_write_bytes_per_s=(7e9,) * 10).write_bytes_per_s == 64e9
    assert (
        preset("a100", disk_write_bytes_per_s=(7e9,), disk_read_bytes_per_s=(5e9,)).read_bytes_per_s
        == 5e9
    )
    with pytest.raises(ValueError, match="no drives"):
        preset("h200").device_costs()
    with pytest.raises(ValueError, match="2 read rates for 1 drives"):
        Hardware("x", 1e12, 1e12, (1e9,), (1e9, 1e9))
    with pytest.raises(ValueError, match="unknown hardware 'b200'"):
        preset("b200")


def test_rates_come_from_the_hardware_only() -> None:
    with pytest.raises(ValueError, match="'write_bytes_per_s'"):
        fxoffload.simulate(
            LayerStack(2),
            torch.randn(8, 256),
            hardware=known_hardware(1e7, 1e7),
            options={"write_bytes_per_s": 1e9},
        )


def test_a_model_larger_than_memory_simulates_on_the_meta_device() -> None:
    """32 GiB of bfloat16 weights (more than this machine has) and nothing allocated."""
    width, tokens, layers = 65536, 2048, 4
    with torch.device("meta"):
        model = torch.nn.Sequential(
            *[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]
        ).to(torch.bfloat16)
        x = torch.randn(tokens, width, dtype=torch.bfloat16)
    hardware = preset("h100", disk_write_bytes_per_s=(7e9,))
    sim = fxoffload.simulate(model, x, hardware=hardware, budgets=())
    none = sim.predictions["none"]
    # Each layer but the first saves its input for its weight's gradient; weights are parameters.
    assert none.activation_bytes == (layers - 1) * tokens * width * 2
    assert sim.predictions["adaptive"].offloaded_fraction > 0


def test_attention_is_traced_flash_style_on_the_meta_device() -> None:
    """The meta device's SDPA would save the (seq, seq) attention matrix; the CPU's flash
    kernel, which the simulator traces with, saves the output and the logsumexp."""
    seq = 4096
    with torch.device("meta"):
        model = MetaAttention(1024, 8).to(torch.bfloat16)
        x = torch.randn(1, seq, 1024, dtype=torch.bfloat16)
    hardware = preset("h100", disk_write_bytes_per_s=(7e9,))
    sim = fxoffload.simulate(model, x, hardware=hardware, budgets=())
    shapes = [d.shape for d in sim.predictions["none"].decisions if d.shape is not None]
    assert (1, 8, seq) in shapes  # the logsumexp
    assert not any(shape[-2:] == (seq, seq) for shape in shapes)


def test_cli_simulates_a_factory(tmp_path) -> None:
    (tmp_path / "toy_factory.py").write_text(
        textwrap.dedent(
            """
            import torch

            def make():
                model = torch.nn.Sequential(
                    torch.nn.Linear(512, 2048), torch.nn.GELU(),
                    torch.nn.Linear(2048, 2048), torch.nn.GELU(),
                    torch.nn.Linear(2048, 1),
                )
                return model, torch.randn(256, 512)
            """
        )
    )
    done = run_cli(
        "simulate",
        "toy_factory:make",
        "--flops",
        "0.001",
        "--memory-bw",
        "1",
        "--disk",
        "0.1,0.1",
        "--tbw",
        "600",
        "-o",
        "min_bytes=0",
        pythonpath=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "write 0.2 GB/s" in done.stdout and "(2 drives)" in done.stdout
    assert "days to 600 TBW" in done.stdout and "memory_budget=0.3" in done.stdout
    assert "adaptive plan:" in done.stdout and "offload   hidden:" in done.stdout
    done = run_cli("simulate", "toy_factory:make", "--disk", "1", pythonpath=tmp_path)
    assert (
        done.returncode != 0 and "give --hardware, or both --flops and --memory-bw" in done.stderr
    )


def test_cli_help_lists_simulate() -> None:
    done = run_cli("simulate", "--help")
    assert done.returncode == 0
    assert "--disk GBPS[,GBPS...]" in done.stdout and "--tbw" in done.stdout


def test_only_the_policies_asked_for_are_planned() -> None:
    torch.manual_seed(0)
    hardware = known_hardware(1e7, 1e7)
    sim = fxoffload.simulate(
        LayerStack(2), torch.randn(8, 256), hardware=hardware, policies=("none",), budgets=(0.5,)
    )
    assert list(sim.predictions) == ["none", "memory_budget=0.5"]
    with pytest.raises(ValueError, match="unknown policies \\['checkpoint'\\]"):
        fxoffload.simulate(
            LayerStack(2), torch.randn(8, 256), hardware=hardware, policies=("checkpoint",)
        )


def test_no_engine_or_offload_directory_is_touched(tmp_path) -> None:
    """The engine of a directory that does not exist would fail to start: none is started."""
    torch.manual_seed(0)
    absent = tmp_path / "absent"
    sim = fxoffload.simulate(
        LayerStack(6),
        torch.randn(64, 256),
        hardware=known_hardware(1e7, 1e7),
        options={"min_bytes": 0, "offload_dir": str(absent)},
        budgets=(),
    )
    assert sim.predictions["all"].bytes_written > 0
    assert not absent.exists()  # an engine refuses a directory that does not exist
