"""End to end: train toy models with real torch.compile and real offload files.

Each model trains a few SGD steps three times from the same initial weights
and seed: eagerly, compiled with ``policy="none"`` (same partitioner and
compiler, nothing offloaded) and compiled with ``policy="all"``. Offloading
moves bytes and must not change math, so every loss, gradient and final
parameter or buffer of ``"all"`` is bitwise that of ``"none"``; both are
close to eager, which catches a baseline that is itself wrong. Along the way
the offload files are watched on disk: they must exist while the graph is
alive and be gone once backward has freed it.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import slots_freed
from torch import nn
from training_runs import Run, assert_runs_close, assert_runs_equal, reproducible

import fxoffload
from fxoffload.runtime import Engine, engines

STEPS = 3
SEED = 0

# Disabling inductor's caches (see ``reproducible``) also disables dynamo's
# profile-guided shapes, which torch announces on every compile.
pytestmark = pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled:UserWarning")


class MLP(nn.Module):
    """Linear layers and ReLU: saves the ReLU outputs, the next matmul's inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv2d, BatchNorm (its running stats are buffers that forward mutates),
    ReLU, max-pooling (under aot_eager its int64 indices are saved) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(h.flatten(1))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: multi-head self-attention written with matmuls and
    softmax (saves transposed and permuted views), dropout in training mode
    (the RNG must replay identically), and a GELU MLP."""

    def __init__(self, dim: int = 64, heads: int = 4, p: float = 0.1) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        x = x + self.drop(self.proj(self.attend(q, k, v).transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return self.drop(att.softmax(dim=-1)) @ v


class SDPATransformerBlock(TransformerBlock):
    """The same block with causal ``F.scaled_dot_product_attention``: a fused
    attention op whose extra outputs (log-sum-exp) are saved for backward."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


Batch = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Case:
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[], Batch]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    has_dropout: bool = False


CASES = {
    "mlp": Case(MLP, lambda: (torch.randn(64, 64), torch.randint(0, 10, (64,))), F.cross_entropy),
    "cnn": Case(
        SmallCNN,
        lambda: (torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))),
        F.cross_entropy,
    ),
    "transformer": Case(
        TransformerBlock,
        lambda: (torch.randn(4, 32, 64), torch.randn(4, 32, 64)),
        F.mse_loss,
        has_dropout=True,
    ),
    "sdpa-transformer": Case(
        SDPATransformerBlock,
        lambda: (torch.randn(4, 32, 64), torch.randn(4, 32, 64)),
        F.mse_loss,
        has_dropout=True,
    ),
}


def engine_at(offload_dir: Path) -> Engine:
    """The engine writing under ``offload_dir`` (created by the first compile)."""
    (engine,) = [e for e in engines() if Path(e.roots[0]).resolve() == offload_dir.resolve()]
    return engine


def poll(condition: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Writes are asynchronous: give them a moment to land."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def check_first_forward_on_disk(offload_dir: Path, before: fxoffload.OffloadStats) -> None:
    """After forward, before backward: every stored tensor is in a slot of the file on disk."""
    engine = engine_at(offload_dir)
    stored = fxoffload.stats().tensors_stored - before.tensors_stored
    assert stored > 0
    assert engine.live_entries() == stored
    assert fxoffload.stats().handles_live - before.handles_live == stored
    assert poll(lambda: engine.inflight_bytes == 0)  # every write has landed
    written = fxoffload.stats().bytes_written - before.bytes_written
    assert written == engine.drives[0].file.bytes_in_use > 0
    assert os.path.getsize(engine.drives[0].file.path) >= written


def check_first_backward_read_all(before: fxoffload.OffloadStats) -> None:
    """Every write had finished, so each stored tensor came back by one read."""
    now = fxoffload.stats()
    assert now.tensors_forwarded == before.tensors_forwarded
    assert now.bytes_read - before.bytes_read == now.bytes_written - before.bytes_written


def check_nothing_held(offload_dir: Path, before: fxoffload.OffloadStats) -> None:
    """The step's graph is freed: its slots are free and its handles released."""
    engine = engine_at(offload_dir)
    assert engine.live_entries() == 0
    slots_freed(engine)
    assert fxoffload.stats().handles_live == before.handles_live
    # What it keeps are idle buffers for the next step, within the pool's cap.
    assert 0 < engine.staging_bytes_held <= fxoffload.config.staging_pool_bytes
    assert fxoffload.stats().staging_bytes_held >= engine.staging_bytes_held


def train(
    case: Case, model: nn.Module, batches: list[Batch], options: dict | None, offload_dir: Path
) -> Run:
    """Train a copy of ``model``: eagerly if ``options`` is None, else compiled.

    With ``policy="all"``, the first step stops between forward and backward
    until every file is written, and its backward must read each back; the
    later steps run straight through, so backward may meet writes still in
    flight and take those tensors from memory.
    """
    torch._dynamo.reset()
    model = copy.deepcopy(model)
    step = model if options is None else torch.compile(model, backend="ssdtrain", options=options)
    offloading = options is not None and options["policy"] == "all"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    torch.manual_seed(SEED)
    fxoffload.reset_stats()
    run = Run()
    for i, (x, y) in enumerate(batches):
        before = fxoffload.stats()
        loss = case.loss_fn(step(x), y)
        if offloading and i == 0:
            check_first_forward_on_disk(offload_dir, before)
        loss.backward()
        if offloading and i == 0:
            check_first_backward_read_all(before)
        run.losses.append(loss.detach())
        run.grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
        del loss
        gc.collect()
        if offloading:
            check_nothing_held(offload_dir, before)
    run.final_state = {k: v.clone() for k, v in model.state_dict().items()}
    run.stats = fxoffload.stats()
    return run


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("name", list(CASES))
def test_offloaded_training_matches_baseline_bitwise(
    name: str, compiler: str, tmp_path: Path
) -> None:
    case = CASES[name]
    torch.manual_seed(SEED)
    model = case.make_model()
    batches = [case.make_batch() for _ in range(STEPS)]
    options = {"compiler": compiler, "min_bytes": 1024, "offload_dir": str(tmp_path)}
    # Inductor draws dropout masks with its own RNG (seeded from torch's
    # generator, but not eager's bernoulli_ stream), so with dropout only
    # aot_eager, which runs eager's kernels, can match eager.
    compare_with_eager = not (case.has_dropout and compiler == "inductor")
    with reproducible(compiler):
        baseline = train(case, model, batches, {**options, "policy": "none"}, tmp_path)
        offloaded = train(case, model, batches, {**options, "policy": "all"}, tmp_path)
        if compare_with_eager:
            assert_runs_close(train(case, model, batches, None, tmp_path), baseline)

    # The baseline wrote nothing; the offloaded run wrote and got it all back.
    assert baseline.stats.tensors_stored == 0 and baseline.stats.bytes_written == 0
    assert offloaded.stats.tensors_stored > 0 and offloaded.stats.bytes_written > 0
    assert offloaded.stats.bytes_read > 0 or offloaded.stats.tensors_forwarded > 0
    assert offloaded.stats.io_errors == 0
    assert_runs_equal(baseline, offloaded)
