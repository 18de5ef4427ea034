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

from importlib.metadata import PackageNotFoundError, version

from fxoffload import config
from fxoffload import ops as _ops  # noqa: F401  (registers the ssdtrain:: ops)
from fxoffload.backend import ssdtrain
from fxoffload.explain import Explanation, explain
from fxoffload.hardware import Hardware
from fxoffload.options import Options
from fxoffload.runtime import registry as _registry
from fxoffload.runtime import stats as _stats
from fxoffload.runtime.stats import OffloadStats
from fxoffload.simulate import Simulation, simulate

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


def stats() -> OffloadStats:
    """What the engines of this process did (bytes written and read, tensors forwarded...)
    and what they hold now (live handles, file bytes)."""
    return _registry.snapshot()


def reset_stats() -> None:
    """Zero the counters; the gauges of what is held right now are unaffected."""
    _stats.reset()
