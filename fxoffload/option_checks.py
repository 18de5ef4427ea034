"""What an option's value must be, written in its annotation in ``fxoffload.config``.

``config.py`` annotates each option once, ``Annotated[type, *constraints]``;
``Options`` and the runtime's ``EngineConfig`` are built from those
annotations, and :func:`check` is the one validation of every value.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Annotated, Literal


@dataclasses.dataclass(frozen=True)
class AtLeast:
    bound: float


@dataclasses.dataclass(frozen=True)
class Above:
    bound: float


@dataclasses.dataclass(frozen=True)
class AtMost:
    bound: float


@dataclasses.dataclass(frozen=True)
class MultipleOf:
    factor: int


ENGINE = "engine"
"""Marks the I/O options: with ``offload_dir``, what an engine is."""


def parts(annotation: object) -> tuple[object, tuple[object, ...]]:
    """An annotation's type and its constraints (none outside ``Annotated``)."""
    if typing.get_origin(annotation) is Annotated:
        base, *constraints = typing.get_args(annotation)
        return base, tuple(constraints)
    return annotation, ()


def check(name: str, value: object, annotation: object) -> None:
    """Raise ``ValueError`` naming option ``name`` unless ``value`` fits ``annotation``."""
    base, constraints = parts(annotation)
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        if value is None:
            return
        (base,) = (a for a in typing.get_args(base) if a is not type(None))
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ValueError(
                f"fxoffload option {name!r} must be one of {', '.join(map(repr, choices))}; "
                f"got {value!r}"
            )
        return
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"fxoffload option {name!r} must be True or False; got {value!r}")
        return
    bounds = [c for c in constraints if isinstance(c, (AtLeast, Above))]
    bound = " ".join(f"{'>=' if isinstance(c, AtLeast) else '>'} {c.bound}" for c in bounds)
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int) or not _within(value, bounds):
            raise ValueError(f"fxoffload option {name!r} must be an integer {bound}; got {value!r}")
    elif base is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and _within(value, bounds)):
            raise ValueError(f"fxoffload option {name!r} must be a number {bound}; got {value!r}")
    for c in constraints:
        if isinstance(c, AtMost) and value > c.bound:
            raise ValueError(f"fxoffload option {name!r} must be <= {c.bound:g}; got {value}")
        if isinstance(c, MultipleOf) and value % c.factor:
            raise ValueError(
                f"fxoffload option {name!r} must be a multiple of {c.factor}; got {value}"
            )


def _within(value: float, bounds: list[AtLeast | Above]) -> bool:
    return all(value >= b.bound if isinstance(b, AtLeast) else value > b.bound for b in bounds)
