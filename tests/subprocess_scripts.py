"""Code that tests run in a fresh interpreter, as a user's script would."""

from __future__ import annotations

import os
import subprocess
import sys

TINY_TRAINING_STEP = """
import sys
import torch

offload_dir = sys.argv[1]
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
options = {"compiler": "aot_eager", "policy": "all", "min_bytes": 0, "offload_dir": offload_dir}
compiled = torch.compile(model, backend="ssdtrain", options=options)
compiled(torch.randn(32, 64)).sum().backward()
"""
"""One step of a tiny MLP with the ssdtrain backend; ``sys.argv[1]`` is the offload dir.
Its one offloaded activation (the ReLU output) is 32 KiB: too small for "adaptive"
to hide, so the policy is "all"."""


def run_python(
    code: str, *args: str, python: str = sys.executable, cwd: str | None = None, **env: str
) -> subprocess.CompletedProcess:
    """Run ``code`` with ``args`` in ``cwd`` (which comes first on ``sys.path``);
    ``env`` adds variables (TORCH_LOGS is never inherited)."""
    base = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    return subprocess.run(
        [python, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**base, **env},
        cwd=cwd,
        check=False,
    )
