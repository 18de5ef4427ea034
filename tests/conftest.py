"""Fixtures every test file gets."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
import torch


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
