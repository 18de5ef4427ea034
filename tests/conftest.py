"""Fixtures every test file gets."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """No compiled code or guards carried over from, or into, another test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
