"""``backend="ssdtrain"`` works from the installed entry point alone."""

from __future__ import annotations

from subprocess_scripts import TINY_TRAINING_STEP, run_python


def test_backend_found_without_importing_fxoffload(tmp_path) -> None:
    script = (
        "import sys\nassert 'fxoffload' not in sys.modules\n"
        + TINY_TRAINING_STEP
        + "stats = sys.modules['fxoffload'].stats()\n"
        + "print('stored', stats.tensors_stored, 'written', stats.bytes_written)\n"
    )
    done = run_python(script, str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "stored 1 written 32768" in done.stdout
    # The engine removed its private directory at exit (the measured rates are cached per
    # user, not here).
    assert list(tmp_path.iterdir()) == []
