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

from fxoffload.runtime.private_dir import make_private_dir, remove_stale_dirs


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
    path = make_private_dir(str(tmp_path))
    assert re.fullmatch(rf"fxoffload-{os.getpid()}-\w+", os.path.basename(path))
    assert os.stat(path).st_mode & 0o777 == 0o700


def test_name_carries_the_rank_torchrun_sets(tmp_path, monkeypatch) -> None:
    """Before ``init_process_group`` (a model may be compiled first), ``RANK`` names it."""
    monkeypatch.setenv("RANK", "3")
    path = make_private_dir(str(tmp_path))
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
        path = make_private_dir(str(root))
    finally:
        dist.destroy_process_group()
    assert re.fullmatch(rf"fxoffload-rank0-{os.getpid()}-\w+", os.path.basename(path))


def test_stale_dirs_of_both_forms_are_removed_live_ones_kept(tmp_path) -> None:
    dead, live = dead_pid(), os.getppid()
    stale = [tmp_path / f"fxoffload-{dead}-abc123", tmp_path / f"fxoffload-rank1-{dead}-abc456"]
    kept = [
        tmp_path / f"fxoffload-{live}-def123",
        tmp_path / f"fxoffload-rank0-{live}-def456",
        tmp_path / f"fxoffload-rankX-{dead}-ghi789",  # not a name of ours
        tmp_path / f"other-{dead}-jkl012",
    ]
    for d in stale + kept:
        d.mkdir()
        (d / "offload.bin").write_bytes(b"x")
    not_a_dir = tmp_path / f"fxoffload-rank2-{dead}-file00"
    not_a_dir.write_bytes(b"x")
    assert sorted(remove_stale_dirs(str(tmp_path))) == sorted(str(d) for d in stale)
    assert sorted(tmp_path.iterdir()) == sorted([*kept, not_a_dir])


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
            (root / f"fxoffload-rank{i % 2}-{dead}-x{i}").mkdir()
        errors = clean_at_once(root, workers=4)
        assert not errors, errors[0]
        assert list(root.iterdir()) == []
