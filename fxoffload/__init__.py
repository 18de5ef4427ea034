"""fxoffload: activation offloading to NVMe files as a torch.compile backend.

Saved activations are written to files during forward and read back, just in
time, during backward; gradients are bitwise those of the same compile
without offloading.

Example::

    >>> import torch, fxoffload
    >>> model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.GELU(),
    ...                             torch.nn.Linear(512, 1))
    >>> compiled = torch.compile(model, backend="ssdtrain",
    ...                          options={"compiler": "aot_eager", "min_bytes": 0})
    >>> compiled(torch.randn(256, 512)).sum().backward()
    >>> fxoffload.stats().bytes_written > 0
    True
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from fxoffload import config
from fxoffload import ops as _ops  # noqa: F401  (defines the ssdtrain:: ops)
from fxoffload.options import Options

if TYPE_CHECKING:
    from fxoffload.backend import ssdtrain
    from fxoffload.explanation import Explanation, explain
    from fxoffload.hardware import Hardware
    from fxoffload.runtime.stats import OffloadStats
    from fxoffload.simulation import Simulation, simulate

try:
    __version__ = version("fxoffload")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "Explanation",
    "Hardware",
    "OffloadStats",
    "Options",
    "Simulation",
    "config",
    "explain",
    "reset_stats",
    "simulate",
    "ssdtrain",
    "stats",
]

_LAZY = {
    "Explanation": "fxoffload.explanation",
    "Hardware": "fxoffload.hardware",
    "OffloadStats": "fxoffload.runtime.stats",
    "Simulation": "fxoffload.simulation",
    "explain": "fxoffload.explanation",
    "simulate": "fxoffload.simulation",
    "ssdtrain": "fxoffload.backend",
}
"""Imported on first use, so that ``import fxoffload.passes`` does not bring in the runtime."""


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'fxoffload' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


def stats() -> OffloadStats:
    """What the engines of this process did and what they hold now: see ``OffloadStats``.

    A frozen dataclass; ``stats().as_dict()`` (or ``dataclasses.asdict``) gives a dict.
    """
    from fxoffload.runtime import registry

    return registry.snapshot()


def reset_stats() -> None:
    """Zero the counters; the gauges of what is held right now are unaffected."""
    from fxoffload.runtime import stats as counters

    counters.reset()
