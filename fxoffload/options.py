"""The backend's options: one frozen record, built from the ``options=`` dict.

``torch.compile(model, backend="ssdtrain", options={...})`` hands the dict to
the backend untouched; :func:`Options.from_dict` is the single place that
checks it, so a typo fails at compile time with the list of valid keys instead
of being ignored.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from typing import Any, Literal

from fxoffload.runtime.engine import EngineConfig

Policy = Literal["all", "none"]
Compiler = Literal["inductor", "aot_eager"]
IOMode = Literal["auto", "direct", "buffered"]

POLICIES: tuple[str, ...] = ("all", "none")
COMPILERS: tuple[str, ...] = ("inductor", "aot_eager")
IO_MODES: tuple[str, ...] = ("auto", "direct", "buffered")
ON_IO_ERROR: tuple[str, ...] = ("keep", "raise")
_ENGINE_DEFAULTS = EngineConfig()


def default_offload_dir() -> str:
    """``$FXOFFLOAD_DIR`` if set, else the system temporary directory."""
    return os.environ.get("FXOFFLOAD_DIR") or tempfile.gettempdir()


@dataclasses.dataclass(frozen=True)
class Options:
    """What to offload, where to, and which compiler runs the rewritten graphs.

    Attributes:
        offload_dir: directory that holds the offload files. The engine makes a
            private subdirectory in it (mode 0700) and removes it at exit.
        policy: ``"all"`` offloads every eligible saved activation; ``"none"``
            rewrites nothing but keeps the same partitioner and compiler, so it
            is the in-process baseline that offloading must match bit for bit.
        min_bytes: saved tensors smaller than this stay in memory: their I/O
            would cost more than the memory they free.
        compiler: the compiler for the rewritten forward and backward graphs.
            ``"inductor"`` for training, ``"aot_eager"`` for fast tests and
            debugging.
        io_threads: worker threads per offload directory that read and write.
        chunk_bytes: tensors are written and read in chunks of this size (a
            multiple of 4096), so several threads keep the disk busy.
        max_inflight_bytes: at most this many bytes wait to be written; a
            ``store`` beyond it waits (counted in ``stats().store_waits``).
            This bounds the memory that offloading itself holds.
        io_mode: ``"direct"`` (O_DIRECT), ``"buffered"``, or ``"auto"``:
            direct where the file system supports it.
        verify: checksum (CRC-32) each chunk when written, check it when read,
            so a file changed under us is an error, never wrong gradients.
        on_io_error: when a write fails (disk full, ...): ``"keep"`` the
            tensor in memory and go on (one warning, ``stats().io_errors``),
            or ``"raise"`` an error naming the file and the free space.

    The I/O settings apply when the first compile creates the engine of an
    ``offload_dir``; later compiles with the same directory share it.
    """

    offload_dir: str = dataclasses.field(default_factory=default_offload_dir)
    policy: Policy = "all"
    min_bytes: int = 1 << 20
    compiler: Compiler = "inductor"
    io_threads: int = _ENGINE_DEFAULTS.io_threads
    chunk_bytes: int = _ENGINE_DEFAULTS.chunk_bytes
    max_inflight_bytes: int = _ENGINE_DEFAULTS.max_inflight_bytes
    io_mode: IOMode = _ENGINE_DEFAULTS.io_mode
    verify: bool = _ENGINE_DEFAULTS.verify
    on_io_error: Literal["keep", "raise"] = "keep"

    def __post_init__(self) -> None:
        if not isinstance(self.offload_dir, (str, os.PathLike)) or not str(self.offload_dir):
            raise ValueError(
                f"fxoffload option 'offload_dir' must be a non-empty path, got {self.offload_dir!r}"
            )
        object.__setattr__(self, "offload_dir", os.fspath(self.offload_dir))
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("compiler", self.compiler, COMPILERS)
        _check_int("min_bytes", self.min_bytes, minimum=0)
        _check_int("io_threads", self.io_threads, minimum=1)
        _check_int("chunk_bytes", self.chunk_bytes, minimum=4096)
        if self.chunk_bytes % 4096:
            raise ValueError(
                f"fxoffload option 'chunk_bytes' must be a multiple of 4096; got {self.chunk_bytes}"
            )
        _check_int("max_inflight_bytes", self.max_inflight_bytes, minimum=1)
        _check_choice("io_mode", self.io_mode, IO_MODES)
        _check_choice("on_io_error", self.on_io_error, ON_IO_ERROR)
        if not isinstance(self.verify, bool):
            raise ValueError(
                f"fxoffload option 'verify' must be True or False; got {self.verify!r}"
            )

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            io_threads=self.io_threads,
            chunk_bytes=self.chunk_bytes,
            max_inflight_bytes=self.max_inflight_bytes,
            io_mode=self.io_mode,
            verify=self.verify,
            on_io_error=self.on_io_error,
        )

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


def _check_int(key: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"fxoffload option {key!r} must be an integer >= {minimum}; got {value!r}")
