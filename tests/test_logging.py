"""``TORCH_LOGS`` and ``TORCH_TRACE`` show the plan and the rewritten graphs."""

from __future__ import annotations

import torch
from subprocess_scripts import TINY_TRAINING_STEP, run_python

import fxoffload


def run(tmp_path, **env: str) -> str:
    done = run_python(TINY_TRAINING_STEP, str(tmp_path), **env)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_torch_logs_fxoffload_prints_the_plan(tmp_path) -> None:
    err = run(tmp_path, TORCH_LOGS="fxoffload")
    assert "offloading 1 of 3 saved values (32768 bytes written)" in err
    assert "relu " in err and "activation: held only for backward" in err
    assert "parameter or buffer" in err
    assert "ssdtrain.store" not in err  # graphs only at debug level


def test_torch_logs_debug_adds_the_rewritten_graphs(tmp_path) -> None:
    err = run(tmp_path, TORCH_LOGS="+fxoffload")
    assert "rewritten forward:" in err and "torch.ops.ssdtrain.store.default(relu" in err
    assert "rewritten backward:" in err and "torch.ops.ssdtrain.wait.default(relu_handle" in err
    assert "keep primals_3: forward input" in err  # one line per rejected candidate


def test_no_output_without_torch_logs(tmp_path) -> None:
    assert "offloading" not in run(tmp_path)


def test_torch_trace_records_artifacts_for_tlparse(tmp_path) -> None:
    trace = tmp_path / "trace"
    run(tmp_path, TORCH_TRACE=str(trace))
    text = "".join(p.read_text() for p in trace.iterdir())
    for name in ("fxoffload_plan", "fxoffload_forward_graph", "fxoffload_backward_graph"):
        assert f'"name": "{name}"' in text
    assert "ssdtrain.store.default" in text


def test_config_patch_sets_defaults(tmp_path) -> None:
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    with fxoffload.config.patch(policy="none", compiler="aot_eager", offload_dir=str(tmp_path)):
        report = fxoffload.explain(model, torch.randn(32, 64), options={"min_bytes": 0})
    assert "ssdtrain" not in report.forward_code
    assert fxoffload.config.policy == "adaptive"
    report = fxoffload.explain(
        model,
        torch.randn(32, 64),
        options={
            "policy": "all",
            "min_bytes": 0,
            "compiler": "aot_eager",
            "offload_dir": str(tmp_path),
        },
    )
    assert "ssdtrain.store" in report.forward_code
