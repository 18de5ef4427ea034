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
    engine.drives[0].pool.submit(gate.wait)
    return gate


def slots_freed(engine: Engine) -> None:
    """Wait until the offload file has no slot in use.

    A write still in flight when its handle died frees its slot when its last
    chunk settles, on an I/O thread, a moment later.
    """
    deadline = time.monotonic() + 10
    while engine.drives[0].file.bytes_in_use and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.drives[0].file.bytes_in_use == 0
