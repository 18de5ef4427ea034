"""Training runs compared step by step: shared by the end-to-end test files."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator

import torch

import fxoffload


@dataclasses.dataclass
class Run:
    """What one training run produced, per step and at the end."""

    losses: list[torch.Tensor] = dataclasses.field(default_factory=list)
    grads: list[dict[str, torch.Tensor | None]] = dataclasses.field(default_factory=list)
    final_state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    stats: fxoffload.OffloadStats = dataclasses.field(default_factory=fxoffload.OffloadStats)
    """Counters of the run (reset at its start)."""


@contextlib.contextmanager
def reproducible(compiler: str) -> Iterator[None]:
    """Make two inductor compiles of one model produce the same kernels.

    Inductor is not run-to-run bitwise reproducible by itself: with caches on,
    one run may reuse what an earlier compile or process left (kernels, or
    profile-guided dynamic shapes) while the other compiles afresh, and the
    kernels it generates (how reductions are split) depend on the thread count.
    On a GPU it times candidate reduction configs on first run and keeps the
    fastest, so two compiles may sum in different orders; ``deterministic``
    picks without timing. So caches off, one thread and ``deterministic``, for
    every run of an inductor test.
    """
    if compiler != "inductor":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch._inductor.config.patch(force_disable_caches=True, deterministic=True):
            yield
    finally:
        torch.set_num_threads(threads)


def losses_and_grads(
    model: torch.nn.Module,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
) -> list[torch.Tensor]:
    """One training step per batch (``loss_of`` runs the compiled forward); each step's
    loss, then each parameter's grad, in one flat list for bitwise comparison."""
    out: list[torch.Tensor] = []
    for x in batches:
        model.zero_grad()
        loss = loss_of(x)
        loss.backward()
        out += [loss.detach(), *(p.grad.clone() for p in model.parameters())]
    return out


def assert_runs_equal(a: Run, b: Run) -> None:
    """Bitwise, step by step, so a failure names the first step and tensor that diverged."""
    steps = zip(a.losses, b.losses, a.grads, b.grads, strict=True)
    for step, (la, lb, ga, gb) in enumerate(steps):
        assert torch.equal(la, lb), f"step {step}: loss {la.item()} != {lb.item()}"
        assert ga.keys() == gb.keys()
        for name in ga:
            x, y = ga[name], gb[name]
            assert (x is None) == (y is None), f"step {step}: {name} has a grad in one run only"
            assert x is None or torch.equal(x, y), f"step {step}: grad of {name} differs"
    assert a.final_state.keys() == b.final_state.keys()
    for name in a.final_state:
        assert torch.equal(a.final_state[name], b.final_state[name]), f"final {name} differs"


def assert_runs_close(a: Run, b: Run) -> None:
    """Compiled kernels reorder float math: close, not equal."""
    tol = {"rtol": 1e-3, "atol": 1e-4}
    torch.testing.assert_close(a.losses, b.losses, **tol)
    torch.testing.assert_close(a.grads, b.grads, **tol)
    torch.testing.assert_close(a.final_state, b.final_state, **tol)


class CountingBackend:
    """The ``ssdtrain`` backend with ``options``, counting how often Dynamo compiles."""

    def __init__(self, options: dict) -> None:
        self.options = options
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.compiles += 1
        return fxoffload.ssdtrain(gm, example_inputs, options=self.options)
