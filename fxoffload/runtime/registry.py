"""The engines of this process, one per offload directories and I/O settings, closed at exit.

An engine is what its directory and settings make it, so it is keyed by
both: a compiled graph names them (``fxoffload.ops.engine_key``) and finds
the same engine, or after :func:`close_all` a new one just like it; two
compiles with other settings on one directory get engines of their own.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Sequence

import torch

from fxoffload import ops
from fxoffload.runtime import stats
from fxoffload.runtime.engine import Engine
from fxoffload.runtime.engine_config import EngineConfig
from fxoffload.runtime.handles import handle_id

_lock = threading.Lock()
_engines: dict[tuple[tuple[str, ...], EngineConfig], Engine] = {}
_named: dict[str, Engine] = {}
"""Engines by the key a graph names them with: a store looks its engine up once per key."""


def engine_for(roots: str | Sequence[str], config: EngineConfig | None = None) -> Engine:
    """The engine for directory ``roots`` (or several, one per drive) with ``config``, created
    (and its directories checked) on first use."""
    config = config or EngineConfig()
    roots = (roots,) if isinstance(roots, str) else tuple(roots)
    key = (tuple(os.path.realpath(root) for root in roots), config)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = Engine(roots, config)
        return engine


def engine_named(key: str) -> Engine:
    """The engine that ``key`` (``fxoffload.ops.engine_key``) names."""
    with _lock:
        engine = _named.get(key)
    if engine is None:
        root, settings = ops.parse_engine_key(key)
        engine = engine_for(root, EngineConfig(**settings))
        with _lock:
            _named[key] = engine
    return engine


def engine_of(handle: torch.Tensor) -> Engine:
    """The engine that holds the entry ``handle`` stands for."""
    entry_id = handle_id(handle)
    with _lock:
        engines = list(_engines.values())
    for engine in engines:
        if engine.owns(entry_id):
            return engine
    raise RuntimeError(
        f"fxoffload: handle #{entry_id} belongs to no live engine "
        "(was its graph already freed, or the engine closed?)"
    )


def engines() -> list[Engine]:
    with _lock:
        return list(_engines.values())


def snapshot() -> stats.OffloadStats:
    """The counters plus the gauges of every live engine."""
    live = engines()
    files = [drive.file for e in live for drive in e.drives]
    modes = sorted({"direct" if f.direct else "buffered" for f in files})
    return stats.OffloadStats(
        **stats.counters(),
        handles_live=sum(e.live_entries() for e in live),
        slot_bytes_in_use=sum(f.bytes_in_use for f in files),
        file_bytes=sum(f.size for f in files),
        staging_bytes_held=sum(e.staging_bytes_held for e in live),
        io_mode="+".join(modes),
    )


def close_all() -> None:
    """Close every engine and remove its directory (run at interpreter exit)."""
    with _lock:
        closing = list(_engines.values())
        _engines.clear()
        _named.clear()
    for engine in closing:
        engine.close()


atexit.register(close_all)
