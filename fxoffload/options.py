"""The backend's options: one frozen record, built from the ``options=`` dict.

``torch.compile(model, backend="ssdtrain", options={...})`` hands the dict to
the backend untouched; :func:`Options.from_dict` is the single place that
checks it, so a typo fails at compile time with the list of valid keys instead
of being ignored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Mapping
from typing import Any, Literal

from fxoffload import config

Policy = Literal["adaptive", "all", "none"]
Compiler = Literal["inductor", "aot_eager"]
IOMode = Literal["auto", "direct", "buffered"]
CostModel = Literal["flops", "profile"]

POLICIES: tuple[str, ...] = ("adaptive", "all", "none")
COMPILERS: tuple[str, ...] = ("inductor", "aot_eager")
IO_MODES: tuple[str, ...] = ("auto", "direct", "buffered")
COST_MODELS: tuple[str, ...] = ("flops", "profile")
ON_IO_ERROR: tuple[str, ...] = ("keep", "raise")
RATES: tuple[str, ...] = (
    "write_bytes_per_s",
    "read_bytes_per_s",
    "flops_per_s",
    "memory_bytes_per_s",
)
"""The cost model's device rates: None means measured."""
IO_OPTIONS: tuple[str, ...] = (
    "io_threads",
    "chunk_bytes",
    "max_inflight_bytes",
    "io_mode",
    "verify",
    "on_io_error",
    "staging_pool_bytes",
)
"""The options that say how an engine does I/O: with ``offload_dir``, an engine's identity."""


def default_offload_dir() -> str:
    """``config.offload_dir``, else ``$FXOFFLOAD_DIR``, else the system temporary directory."""
    return config.offload_dir or os.environ.get("FXOFFLOAD_DIR") or tempfile.gettempdir()


def _default(name: str):
    """A field whose default is read from ``fxoffload.config`` when an Options is made."""
    return dataclasses.field(default_factory=lambda: getattr(config, name))


@dataclasses.dataclass(frozen=True)
class Options:
    """What to offload, where to, and which compiler runs the rewritten graphs.

    One field per option; ``fxoffload.config`` documents each and holds its
    default, read when the Options is made (so ``config.patch`` applies).
    ``offload_dir`` and the I/O options (``IO_OPTIONS``) name the engine that
    runs a compiled graph: compiles that agree on all of them share one.
    """

    offload_dir: str = dataclasses.field(default_factory=default_offload_dir)
    policy: Policy = _default("policy")
    memory_budget: float = _default("memory_budget")
    min_bytes: int = _default("min_bytes")
    io_safety: float = _default("io_safety")
    prefetch_budget_bytes: int = _default("prefetch_budget_bytes")
    max_overhead: float = _default("max_overhead")
    write_bytes_per_s: float | None = _default("write_bytes_per_s")
    read_bytes_per_s: float | None = _default("read_bytes_per_s")
    flops_per_s: float | None = _default("flops_per_s")
    memory_bytes_per_s: float | None = _default("memory_bytes_per_s")
    cost_model: CostModel = _default("cost_model")
    compiler: Compiler = _default("compiler")
    io_threads: int = _default("io_threads")
    chunk_bytes: int = _default("chunk_bytes")
    max_inflight_bytes: int = _default("max_inflight_bytes")
    io_mode: IOMode = _default("io_mode")
    verify: bool = _default("verify")
    on_io_error: Literal["keep", "raise"] = _default("on_io_error")
    staging_pool_bytes: int = _default("staging_pool_bytes")

    def __post_init__(self) -> None:
        if self.offload_dir is None:  # as config.offload_dir = None: the documented default
            object.__setattr__(self, "offload_dir", default_offload_dir())
        if not isinstance(self.offload_dir, (str, os.PathLike)) or not str(self.offload_dir):
            raise ValueError(
                f"fxoffload option 'offload_dir' must be a non-empty path, got {self.offload_dir!r}"
            )
        object.__setattr__(self, "offload_dir", os.fspath(self.offload_dir))
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("compiler", self.compiler, COMPILERS)
        _check_choice("cost_model", self.cost_model, COST_MODELS)
        _check_int("min_bytes", self.min_bytes, minimum=0)
        _check_float("memory_budget", self.memory_budget, minimum=0.0)
        if self.memory_budget > 1:
            raise ValueError(
                f"fxoffload option 'memory_budget' must be <= 1; got {self.memory_budget}"
            )
        if self.memory_budget < 1 and self.policy == "none":
            raise ValueError(
                "fxoffload option 'memory_budget' needs policy 'adaptive' or 'all'; for "
                "recomputation alone use torch._functorch.config.activation_memory_budget"
            )
        _check_float("io_safety", self.io_safety, minimum=1.0)
        _check_int("prefetch_budget_bytes", self.prefetch_budget_bytes, minimum=0)
        _check_float("max_overhead", self.max_overhead, minimum=0.0)
        for key in RATES:
            if getattr(self, key) is not None:
                _check_float(key, getattr(self, key), minimum=0.0, inclusive=False)
        _check_int("io_threads", self.io_threads, minimum=1)
        _check_int("chunk_bytes", self.chunk_bytes, minimum=4096)
        if self.chunk_bytes % 4096:
            raise ValueError(
                f"fxoffload option 'chunk_bytes' must be a multiple of 4096; got {self.chunk_bytes}"
            )
        _check_int("max_inflight_bytes", self.max_inflight_bytes, minimum=1)
        _check_choice("io_mode", self.io_mode, IO_MODES)
        _check_choice("on_io_error", self.on_io_error, ON_IO_ERROR)
        _check_int("staging_pool_bytes", self.staging_pool_bytes, minimum=0)
        if not isinstance(self.verify, bool):
            raise ValueError(
                f"fxoffload option 'verify' must be True or False; got {self.verify!r}"
            )

    @property
    def io_settings(self) -> dict[str, Any]:
        """The I/O options (``IO_OPTIONS``) and their values."""
        return {name: getattr(self, name) for name in IO_OPTIONS}

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | Options | None) -> Options:
        """Build options from ``torch.compile``'s dict, rejecting unknown keys."""
        if options is None:
            return cls()
        if isinstance(options, Options):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"fxoffload options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                raise ValueError(
                    f"unknown fxoffload option {key!r}; valid options are: {', '.join(valid)}"
                )
        return cls(**options)


def _check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"fxoffload option {key!r} must be one of {', '.join(map(repr, choices))}; "
            f"got {value!r}"
        )


def _check_float(key: str, value: object, *, minimum: float, inclusive: bool = True) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and (value >= minimum if inclusive else value > minimum)
        and math.isfinite(value)
    )
    if not ok:
        bound = ">=" if inclusive else ">"
        raise ValueError(
            f"fxoffload option {key!r} must be a number {bound} {minimum}; got {value!r}"
        )


def _check_int(key: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"fxoffload option {key!r} must be an integer >= {minimum}; got {value!r}")
