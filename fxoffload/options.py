"""The backend's options: one frozen record, built from the ``options=`` dict.

``torch.compile(model, backend="ssdtrain", options={...})`` hands the dict to
the backend untouched; :func:`Options.from_dict` is the single place that
checks it, so a typo fails at compile time with the list of valid keys instead
of being ignored. The fields, their types, defaults and checks all come from
``fxoffload.config``, where each option is defined once.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from fxoffload import config, option_checks

OPTION_NAMES: tuple[str, ...] = tuple(config.get_config_copy())
"""Every option, in the order ``fxoffload.config`` defines them."""

IO_OPTIONS: tuple[str, ...] = tuple(
    name
    for name in OPTION_NAMES
    if option_checks.ENGINE in option_checks.parts(config.get_type(name))[1]
)
"""The options that say how an engine does I/O: with ``offload_dir``, an engine's identity."""

RATES: tuple[str, ...] = tuple(name for name in OPTION_NAMES if name.endswith("_per_s"))
"""The cost model's device rates (``None``: measured)."""


def offload_dirs(value: object) -> tuple[str, ...]:
    """The directories ``offload_dir`` names: a path, paths joined by ``os.pathsep``, or a list
    of paths; None for ``config.offload_dir`` (``$FXOFFLOAD_DIR`` by default), else the system
    temp directory. Raises ``ValueError`` for anything else, an empty path or a repeated one."""
    if value is None:
        value = config.offload_dir or tempfile.gettempdir()
    if isinstance(value, (str, os.PathLike)):
        paths = os.fspath(value).split(os.pathsep)
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value):
        paths = [os.fspath(v) for v in value]
    else:
        paths = []
    if not paths or not all(paths):
        raise ValueError(
            "fxoffload option 'offload_dir' must be a non-empty path or a list of them, "
            f"got {value!r}"
        )
    real = [os.path.realpath(p) for p in paths]
    for i, path in enumerate(real):
        if path in real[:i]:
            raise ValueError(f"fxoffload option 'offload_dir' names {paths[i]!r} twice")
    return tuple(paths)


def config_fields(names: tuple[str, ...]) -> list[tuple[str, Any, dataclasses.Field]]:
    """Dataclass fields for options ``names``: their types, defaults read from ``fxoffload.config``
    when a record is made (so ``config.patch`` applies)."""
    return [
        (
            name,
            config.get_type(name),
            dataclasses.field(default_factory=functools.partial(getattr, config, name)),
        )
        for name in names
    ]


def check_fields(record: object) -> None:
    """Check each field of ``record`` against its option's annotation in ``fxoffload.config``."""
    for field in dataclasses.fields(record):
        option_checks.check(field.name, getattr(record, field.name), config.get_type(field.name))


class _OptionsBase:
    """What to offload, where to, and which compiler runs the rewritten graphs.

    One field per option of ``fxoffload.config``, which documents each and
    holds its default, read when the Options is made (so ``config.patch``
    applies). ``offload_dir`` and the I/O options (``IO_OPTIONS``) name the
    engine that runs a compiled graph: compiles that agree on all of them share one.
    """

    def __post_init__(self) -> None:
        dirs = offload_dirs(self.offload_dir)
        object.__setattr__(self, "offload_dir", dirs[0] if len(dirs) == 1 else dirs)
        check_fields(self)
        if self.memory_budget < 1 and self.policy == "none":
            raise ValueError(
                "fxoffload option 'memory_budget' needs policy 'adaptive' or 'all'; for "
                "recomputation alone use torch._functorch.config.activation_memory_budget"
            )

    @property
    def offload_dirs(self) -> tuple[str, ...]:
        """The offload directories, one per drive (``offload_dir`` holds one path, or several
        as a tuple)."""
        return offload_dirs(self.offload_dir)

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
        for key in options:
            if key not in OPTION_NAMES:
                raise ValueError(
                    f"unknown fxoffload option {key!r}; valid options are: "
                    f"{', '.join(OPTION_NAMES)}"
                )
        return cls(**options)


Options = dataclasses.make_dataclass(
    "Options",
    config_fields(OPTION_NAMES),
    bases=(_OptionsBase,),
    frozen=True,
    namespace={"__doc__": _OptionsBase.__doc__, "__module__": __name__},
)
