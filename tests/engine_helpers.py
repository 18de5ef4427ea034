"""Helpers for tests that drive an ``Engine`` directly (CPU and CUDA test files)."""

from __future__ import annotations

import threading
import time

from fxoffload.runtime import Engine


def written(engine: Engine) -> None:
    """Wait until no store is waiting for its write."""
    deadline = time.monotonic() + 10
    while engine.inflight_bytes and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.inflight_bytes == 0


def block_io_thread(engine: Engine) -> threading.Event:
    """Occupy the engine's only I/O thread until the returned event is set."""
    gate = threading.Event()
    engine._pool.submit(gate.wait)
    return gate
