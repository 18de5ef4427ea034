"""``python -m fxoffload`` in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


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


def test_readme_explain_command_runs_as_written() -> None:
    (command,) = re.findall(r"^python -m fxoffload explain .*$", README.read_text(), re.M)
    done = run_cli(*shlex.split(command)[3:], cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert re.search(r"saved values, [1-9]\d* offloaded", done.stdout), done.stdout[:500]
    assert "ssdtrain.store.default(" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no_colon_here"], "expected MODULE:FACTORY, got 'no_colon_here'"),
        (["toy_factory:make", "-o", "polcy=all"], "unknown fxoffload option 'polcy'"),
        (["toy_factory:make", "-o", "min_bytes=-1"], "'min_bytes' must be an integer >= 0"),
        (["toy_factory:make", "-o", "min_bytes"], "expected KEY=VALUE, got 'min_bytes'"),
        (["no_such_module:make"], "cannot import 'no_such_module'"),
        (["toy_factory:missing"], "module 'toy_factory' has no factory 'missing'"),
    ],
)
def test_command_line_mistakes_are_one_line_and_status_2(tmp_path, args, message) -> None:
    (tmp_path / "toy_factory.py").write_text("def make(): ...\n")
    done = run_cli("explain", *args, pythonpath=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("python -m fxoffload explain: error: "), done.stderr
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_bench_forwards_its_arguments() -> None:
    done = run_cli("bench", "io", "--help")
    assert done.returncode == 0, done.stderr
    assert "io_bandwidth" in done.stdout or "--total-mib" in done.stdout
