"""The runtime: engines that move tensor bytes to files and back.

Knows tensors, bytes and files; never looks at a graph. ``fxoffload.ops`` is
the only caller from compiled code.
"""

from fxoffload.runtime.engine import Engine, EngineConfig
from fxoffload.runtime.registry import close_all, engine_for, engine_of, engines, snapshot
from fxoffload.runtime.stats import OffloadStats

__all__ = [
    "Engine",
    "EngineConfig",
    "OffloadStats",
    "close_all",
    "engine_for",
    "engine_of",
    "engines",
    "snapshot",
]
