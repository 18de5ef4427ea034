"""The runtime: engines that move tensor bytes to files and back.

Knows tensors, bytes and files; never looks at a graph. Compiled code calls
it only through the ``fxoffload.ops`` kernels that ``kernels.py`` registers
when this package is imported.
"""

from fxoffload.runtime import kernels as _kernels  # noqa: F401  (the ops' real kernels)
from fxoffload.runtime.engine import Engine
from fxoffload.runtime.engine_config import EngineConfig
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
