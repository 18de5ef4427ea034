"""``explain()``: what the backend would offload for a model, and the rewritten graphs."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from types import CodeType
from typing import Any

import torch

from fxoffload._compat import (
    cache_entries,
    dynamo_input_codes,
    functorch_config,
    inductor_config,
    reset_code,
)
from fxoffload.backend import compile_with_offloading
from fxoffload.options import Options
from fxoffload.partitioner import PartitionResult
from fxoffload.passes import SavedKind, SavedValue
from fxoffload.report import format_decisions


@dataclasses.dataclass(frozen=True)
class GraphExplanation:
    """One compiled region (a graph break makes several)."""

    decisions: list[SavedValue]
    forward_code: str
    backward_code: str
    budget_note: str | None = None
    """Under ``memory_budget``: what it asked for and what the plan reached."""


@dataclasses.dataclass(frozen=True)
class Explanation:
    """The saved values of every compiled region, their decisions, and the rewritten code."""

    graphs: list[GraphExplanation]

    @property
    def decisions(self) -> list[SavedValue]:
        return [d for g in self.graphs for d in g.decisions]

    @property
    def forward_code(self) -> str:
        return "\n".join(g.forward_code for g in self.graphs)

    @property
    def backward_code(self) -> str:
        return "\n".join(g.backward_code for g in self.graphs)

    def __str__(self) -> str:
        parts = []
        for i, g in enumerate(self.graphs):
            recomputed = [d for d in g.decisions if d.kind is SavedKind.RECOMPUTED]
            saved = [d for d in g.decisions if d.kind is not SavedKind.RECOMPUTED]
            offloaded = [d for d in saved if d.offload]
            parts.append(
                f"graph {i}: {len(saved)} saved values, {len(offloaded)} offloaded "
                f"({sum(d.bytes_written for d in saved)} bytes written), "
                f"{len(saved) - len(offloaded)} kept"
                + (f", {len(recomputed)} recomputed" if recomputed else "")
            )
            if g.budget_note is not None:
                parts.append(g.budget_note)
            parts.append(format_decisions(g.decisions))
            parts.append(f"forward:\n{g.forward_code}")
            parts.append(f"backward:\n{g.backward_code}")
        return "\n".join(parts)


def explain(
    model: torch.nn.Module,
    *example_inputs: Any,
    options: Mapping[str, Any] | Options | None = None,
    **example_kwargs: Any,
) -> Explanation:
    """Compile ``model`` with the ``ssdtrain`` backend, run ``model(*example_inputs,
    **example_kwargs)`` once, and report (``options`` is the backend's, not the model's).

    The forward really runs (and, with offloading on, really writes files,
    released when its outputs are dropped here). Compile caches are bypassed
    so the partitioner runs and its decisions are seen; the compiled code is
    forgotten afterwards (see :func:`compile_once`).

    Raises ``RuntimeError`` when no graph that needs backward was compiled.
    """
    opts = Options.from_dict(options)
    found: list[PartitionResult] = []
    backend = functools.partial(compile_with_offloading, options=opts, on_partition=found.append)
    compile_once(model, example_inputs, example_kwargs, backend)
    if not found:
        raise RuntimeError(
            "fxoffload.explain: no graph that needs backward was compiled, so nothing was "
            "planned. Does any parameter or input require grad? If so, Dynamo ran the model "
            "eagerly; TORCH_LOGS=recompiles,graph_breaks says why."
        )
    return Explanation(
        [
            GraphExplanation(r.decisions, r.forward_code, r.backward_code, r.budget_note)
            for r in found
        ]
    )


def _cache_entry_counts() -> dict[CodeType, int]:
    """How many compiled entries Dynamo holds for each code object it has compiled."""
    codes = (ref() for ref in dynamo_input_codes.seen)
    return {code: len(cache_entries(code)) for code in codes if code is not None}


def compile_once(
    model: torch.nn.Module,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    backend: Callable[..., Any],
) -> None:
    """Compile ``model`` with ``backend`` and call it once on ``args``, compile caches bypassed.

    Dynamo keeps compiled code per code object, and past its recompile limit
    (``torch._dynamo.config.recompile_limit``) runs that code eagerly whatever
    the backend. Each call here compiles with a backend of its own, so the
    code it compiled is reset afterwards: explaining a model under many
    option settings must not leave its training compile running eagerly.
    Dynamo can only reset a code object as a whole, so another model of the
    same class, compiled before, compiles again on its next call.
    """
    compiled = torch.compile(model, backend=backend)
    entries_before = _cache_entry_counts()
    try:
        with (
            functorch_config.patch(enable_autograd_cache=False),
            inductor_config.patch(fx_graph_cache=False),
            torch.enable_grad(),
        ):
            compiled(*args, **kwargs)
    finally:
        for code, count in _cache_entry_counts().items():
            if count > entries_before.get(code, 0):
                reset_code(code)
