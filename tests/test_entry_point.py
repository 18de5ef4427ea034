"""``backend="ssdtrain"`` works from the installed entry point alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_backend_found_without_importing_fxoffload(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        import torch

        assert "fxoffload" not in sys.modules
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)
        )
        compiled = torch.compile(
            model,
            backend="ssdtrain",
            options={{"compiler": "aot_eager", "min_bytes": 0, "offload_dir": {str(tmp_path)!r}}},
        )
        compiled(torch.randn(32, 64)).sum().backward()
        stats = sys.modules["fxoffload"].stats()
        print("stored", stats.tensors_stored, "written", stats.bytes_written)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "stored 1 written 32768" in done.stdout
    # The engine removed its private directory at exit.
    assert list(tmp_path.iterdir()) == []
