"""The wheel a user installs: it registers the backend, ships type hints, knows its version."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import textwrap

from subprocess_scripts import TINY_TRAINING_STEP, run_python

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_wheel_installs_into_a_fresh_venv_and_registers_the_backend(tmp_path) -> None:
    # Build from a copy, so the checkout gets no build/ or egg-info leftovers.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__"),
    )
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("fxoffload-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # torch==2.13.0 is what the tests run on; here it is a local CPU wheel.
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "torch==2.13.0", str(wheel)],
        check=True,
        capture_output=True,
    )
    script = TINY_TRAINING_STEP + textwrap.dedent(
        """
        import importlib.metadata, pathlib
        import fxoffload
        assert "site-packages" in fxoffload.__file__, fxoffload.__file__
        assert (pathlib.Path(fxoffload.__file__).parent / "py.typed").exists()
        assert fxoffload.__version__ == importlib.metadata.version("fxoffload")
        print(fxoffload.__version__, fxoffload.stats().bytes_written)
        """
    )
    # Run outside the checkout, so that the installed package is the one imported.
    done = run_python(script, str(tmp_path), python=str(python), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "NumPy" not in done.stderr, done.stderr  # numpy comes with the package
    version, written = done.stdout.split()
    assert version == "0.1.0" and int(written) > 0
