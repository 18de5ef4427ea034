"""``python -m fxoffload`` in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def run_cli(*args: str, cwd=None, pythonpath=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "fxoffload", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
        check=False,
    )


def test_help_lists_the_commands() -> None:
    done = run_cli("--help")
    assert done.returncode == 0
    assert "explain" in done.stdout and "bench" in done.stdout


def test_explain_prints_decisions_and_graphs(tmp_path) -> None:
    (tmp_path / "toy_factory.py").write_text(
        textwrap.dedent(
            """
            import torch

            def make():
                model = torch.nn.Sequential(
                    torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)
                )
                return model, torch.randn(32, 64)
            """
        )
    )
    done = run_cli(
        "explain",
        "toy_factory:make",
        "-o",
        "compiler=aot_eager",
        "-o",
        "policy=all",
        "-o",
        "min_bytes=0",
        "-o",
        f"offload_dir={tmp_path}",
        pythonpath=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "relu" in done.stdout and "offload   activation: held only for backward" in done.stdout
    assert "torch.ops.ssdtrain.store.default(relu" in done.stdout
    assert "torch.ops.ssdtrain.wait.default(relu_handle" in done.stdout


def test_explain_rejects_a_bad_target() -> None:
    done = run_cli("explain", "no_colon_here")
    assert done.returncode != 0 and "expected MODULE:FACTORY" in done.stderr


def test_bench_forwards_its_arguments() -> None:
    done = run_cli("bench", "io", "--help")
    assert done.returncode == 0, done.stderr
    assert "io_bandwidth" in done.stdout or "--total-mib" in done.stdout
