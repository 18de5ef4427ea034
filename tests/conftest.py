"""Fixtures every test file gets."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Measured rates go to a cache of this run, never the user's (subprocesses inherit it)."""
    os.environ["FXOFFLOAD_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxoffload-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.pop("FXOFFLOAD_CACHE_DIR"), ignore_errors=True)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """No compiled code or guards carried over from, or into, another test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real full disk: a 64 KiB tmpfs, mounted for the test when it may be.

    (A file-size rlimit would fault too, but it is process-wide: pytest's own
    output to a file would fail with it.)"""
    path = tmp_path / "tiny"
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)
