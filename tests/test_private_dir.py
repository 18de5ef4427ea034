"""The engine's private directory: its name per process and rank, and cleanup of dead ones.

Several processes share one ``offload_dir``: the ranks of a node, or jobs
one after another. Each must get its own directory, named so an operator can
tell whose it is, and a directory left by a crashed process must be removed
by the next one, while a live process's directory is never touched.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch.distributed as dist

from fxoffload.runtime import Engine, EngineConfig
from fxoffload.runtime.private_dir import LOCK_NAME, make_private_dir, remove_stale_dirs

CRASH = """
import os, sys
from fxoffload.runtime.private_dir import make_private_dir

os.environ.pop("RANK", None)
print(make_private_dir(sys.argv[1]).path)
os.environ["RANK"] = "1"
print(make_private_dir(sys.argv[1]).path)
os._exit(0)  # as a crash: nothing cleaned up
"""


def crashed_dirs(root: Path) -> list[Path]:
    """The private directories, without and with a rank, of a process that died
    without removing them."""
    done = subprocess.run(
        [sys.executable, "-c", CRASH, str(root)], text=True, capture_output=True, check=True
    )
    return [Path(line) for line in done.stdout.split()]


def dead_pid() -> int:
    """The pid of a process that has exited."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    return int(done.stdout)


@pytest.mark.parametrize("rank_env", [None, "", "not-a-rank", "\u00b2"])
def test_name_outside_a_distributed_job(tmp_path, monkeypatch, rank_env) -> None:
    if rank_env is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank_env)
    path = make_private_dir(str(tmp_path)).path
    assert re.fullmatch(rf"fxoffload-{os.getpid()}-\w+", os.path.basename(path))
    assert os.stat(path).st_mode & 0o777 == 0o700


def test_name_carries_the_rank_torchrun_sets(tmp_path, monkeypatch) -> None:
    """Before ``init_process_group`` (a model may be compiled first), ``RANK`` names it."""
    monkeypatch.setenv("RANK", "3")
    path = make_private_dir(str(tmp_path)).path
    assert re.fullmatch(rf"fxoffload-rank3-{os.getpid()}-\w+", os.path.basename(path))


def test_name_carries_the_process_group_rank(tmp_path, monkeypatch) -> None:
    """An initialized process group is the authority, over a stale ``RANK``."""
    monkeypatch.setenv("RANK", "5")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        root = tmp_path / "offload"
        root.mkdir()
        path = make_private_dir(str(root)).path
    finally:
        dist.destroy_process_group()
    assert re.fullmatch(rf"fxoffload-rank0-{os.getpid()}-\w+", os.path.basename(path))


def test_stale_dirs_of_both_forms_are_removed_live_ones_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    live = [make_private_dir(str(tmp_path)) for _ in range(2)]
    stale = crashed_dirs(tmp_path)
    dead = dead_pid()
    no_lock = tmp_path / f"fxoffload-{dead}-def123"  # being made, or made before locks
    no_lock.mkdir()
    not_ours = [tmp_path / f"fxoffload-rankX-{dead}-ghi789", tmp_path / f"other-{dead}-jkl012"]
    for d in not_ours:
        d.mkdir()
        (d / LOCK_NAME).touch()  # nobody holds it, but the name is not ours
    kept = [*(Path(d.path) for d in live), no_lock, *not_ours]
    not_a_dir = tmp_path / f"fxoffload-rank2-{dead}-file00"
    not_a_dir.write_bytes(b"x")
    try:
        assert sorted(remove_stale_dirs(str(tmp_path))) == sorted(str(d) for d in stale)
        assert sorted(tmp_path.iterdir()) == sorted([*kept, not_a_dir])
    finally:
        for d in live:
            d.remove()


def test_a_live_directory_is_kept_whatever_pid_its_name_carries(tmp_path) -> None:
    """As a process in another PID namespace (another container) sees a live engine's
    directory: the pid in its name runs nowhere here. Its lock says it lives."""
    engine = Engine(str(tmp_path), EngineConfig(io_threads=1))
    try:
        foreign = tmp_path / os.path.basename(engine.drives[0].directory).replace(
            f"-{os.getpid()}-", f"-{dead_pid()}-"
        )
        os.rename(engine.drives[0].directory, foreign)
        remove_stale_dirs(str(tmp_path))
        assert foreign.exists()
    finally:
        engine.close()


def clean_at_once(root: Path, workers: int) -> list[Exception]:
    """``remove_stale_dirs(root)`` on ``workers`` threads released together; their errors."""
    start, errors = threading.Barrier(workers), []

    def clean() -> None:
        start.wait()
        try:
            remove_stale_dirs(str(root))
        except Exception as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=clean) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_ranks_cleaning_one_offload_dir_at_once(tmp_path: Path) -> None:
    """The ranks of a node start together, and each cleans the shared ``offload_dir``:
    a directory another one removed between listing and looking is skipped, not an
    error (before the fix, 4 threads over 200 stale directories failed every time)."""
    dead = dead_pid()
    for trial in range(3):
        root = tmp_path / str(trial)
        root.mkdir()
        for i in range(200):
            stale = root / f"fxoffload-rank{i % 2}-{dead}-x{i}"
            stale.mkdir()
            (stale / LOCK_NAME).touch()  # no process holds its lock
        errors = clean_at_once(root, workers=4)
        assert not errors, errors[0]
        assert list(root.iterdir()) == []
