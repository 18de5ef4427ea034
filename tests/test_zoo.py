"""The zoo: offloaded training is bitwise the baseline, on real models and training patterns.

fxoffload promises that offloading moves bytes and never changes math. This
file checks that promise where users will rely on it: on the models they
compile (Llama, Qwen2, Mistral, a mixture of experts, BERT, T5, Whisper,
ViT, ResNet, ConvNeXt: Hugging Face's own classes, built from tiny configs)
and on the ways they train them (activation checkpointing, bf16 autocast,
dynamic shapes, ``fullgraph``, LoRA, ``retain_graph``, gradient accumulation
through ``torch.autograd.grad``, in-place ops on activations, forwards that
return intermediates and views of them, an LSTM).

Each case trains three SGD steps twice, from the same weights and seed:
compiled with ``policy="none"`` and with ``policy="all"`` and ``min_bytes=0``,
so that every saved activation goes to a file. Losses, every parameter's
gradient, the gradients of float inputs that require grad, and the final
state (buffers such as BatchNorm's running statistics included) must be
``torch.equal``; dropout and drop path are checked to be active where a
case relies on them, so that the replay of random masks is covered too.
The offloaded run must really have written (and the baseline not), without
an I/O error; after every step no handle is left, and once both runs are
over the engine holds no slot, its private directory holds nothing but its
file, and closing it removes the directory.

Every case runs under aot_eager (eager's kernels: cheap to compile) and the
most common models under inductor too, whose two compiles per case are
most of this file's time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import slots_freed
from torch import nn
from torch.utils.checkpoint import checkpoint
from training_runs import assert_runs_equal, reproducible
from zoo_models import (
    BATCH,
    SEQ,
    Batch,
    Case,
    Forward,
    LossOf,
    assert_dropout_is_active,
    assert_gradients_where_expected,
    bert,
    bert_batch,
    causal_lm_batch,
    convnext,
    image_batch,
    llama,
    make,
    mistral,
    qwen2,
    qwen2_moe,
    resnet,
    t5,
    t5_batch,
    train,
    vit,
    whisper,
    whisper_batch,
)

from fxoffload.runtime import close_all, engines
from fxoffload.runtime.private_dir import LOCK_NAME

STEPS = 3
DIM = 64

# Disabling inductor's caches (see ``reproducible``) also disables dynamo's
# profile-guided shapes, which torch announces on every compile.
pytestmark = pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled:UserWarning")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These models' kernels are tiny: a second OpenMP thread costs more than it
    gains, and on a busy two-core machine it stalled each small matmul by
    milliseconds (a step of the tiny Llama took 0.5 s on two threads, 10 ms on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- toy models, one per pattern ---------------------------------------------------------


def toy_batch(i: int, seq: int = SEQ) -> Batch:
    """A float input that requires grad, so its gradient is compared too."""
    return {"x": torch.randn(BATCH, seq, DIM).requires_grad_(), "y": torch.randn(BATCH, seq, DIM)}


RNN_SEQ = 8
"""Recurrences unroll into the graph: a few time steps keep them cheap to compile."""


def rnn_batch(i: int) -> Batch:
    return toy_batch(i, seq=RNN_SEQ)


def regression_loss(forward: Forward, batch: Batch) -> torch.Tensor:
    return F.mse_loss(forward(batch["x"]), batch["y"])


class DropoutMLP(nn.Module):
    """A residual block: LayerNorm, Linear, GELU, dropout, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.LayerNorm(DIM),
            nn.Linear(DIM, 4 * DIM),
            nn.GELU(),
            nn.Dropout(0.1),
            nn.Linear(4 * DIM, DIM),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CheckpointedDropoutBlock(nn.Module):
    """Two blocks, the first under non-reentrant ``torch.utils.checkpoint``: its
    forward runs again in backward, where dropout must draw the same mask."""

    def __init__(self) -> None:
        super().__init__()
        self.first = DropoutMLP()
        self.second = DropoutMLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(checkpoint(self.first, x, use_reentrant=False))


class InPlaceActivations(nn.Module):
    """In-place ops on activations: a scale, a slice zeroed, a ReLU (which
    saves its output), and a sigmoid whose output, saved for its own
    backward, is the next layer's input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(DIM, 4 * DIM)
        self.fc2 = nn.Linear(4 * DIM, 4 * DIM)
        self.fc3 = nn.Linear(4 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h.mul_(0.5)
        h[..., :DIM].zero_()
        h.relu_()
        g = self.fc2(h)
        g.sigmoid_()
        return self.fc3(g)


class ReturnsIntermediate(nn.Module):
    """The forward returns its output, a hidden activation and a transposed view
    of it: graph outputs that alias an activation backward also saves (next to
    one, the GELU's output, that is no output)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(DIM, 2 * DIM)
        self.down = nn.Linear(2 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = torch.tanh(self.up(x))
        return self.down(F.gelu(hidden)), hidden, hidden.transpose(1, 2)


def intermediate_loss(forward: Forward, batch: Batch) -> torch.Tensor:
    """All three outputs in the loss: the intermediates get gradients of their own."""
    out, hidden, hidden_t = forward(batch["x"])
    gram = hidden_t @ hidden  # (batch, 2 * DIM, 2 * DIM)
    return F.mse_loss(out, batch["y"]) + hidden.square().mean() + 1e-3 * gram.mean()


class LSTMRegressor(nn.Module):
    """A two-layer ``nn.LSTM`` with dropout between the layers, and a Linear head
    (dynamo traces RNN modules only with ``allow_rnn``). Its input requires grad,
    so the LSTM decomposes into matmuls and pointwise ops (with an input that
    does not, torch picks a oneDNN kernel whose training fails in AOTAutograd
    itself, with or without offloading)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(DIM, DIM, num_layers=2, dropout=0.1, batch_first=True)
        self.head = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out)


class LSTMCellFunction(torch.autograd.Function):
    """An LSTM cell's pointwise part as one autograd Function, as fused cells
    are written: it saves its optional bias for backward, None when absent."""

    @staticmethod
    def forward(ctx, gates: torch.Tensor, cx: torch.Tensor, bias: torch.Tensor | None):
        if bias is not None:
            gates = gates + bias
        i, f, g, o = gates.chunk(4, dim=-1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        cy = f * cx + i * g
        tanh_cy = cy.tanh()
        ctx.save_for_backward(i, f, g, o, cx, tanh_cy, bias)
        return o * tanh_cy, cy

    @staticmethod
    def backward(ctx, grad_hy: torch.Tensor, grad_cy: torch.Tensor):
        i, f, g, o, cx, tanh_cy, bias = ctx.saved_tensors
        grad_cy = grad_cy + grad_hy * o * (1 - tanh_cy * tanh_cy)
        grad_gates = torch.cat(
            [
                grad_cy * g * i * (1 - i),
                grad_cy * cx * f * (1 - f),
                grad_cy * i * (1 - g * g),
                grad_hy * tanh_cy * o * (1 - o),
            ],
            dim=-1,
        )
        grad_bias = None if bias is None else grad_gates.sum(dim=tuple(range(grad_gates.dim() - 1)))
        return grad_gates, grad_cy * f, grad_bias


class LSTMLike(nn.Module):
    """A recurrence of :class:`LSTMCellFunction`, without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.input = nn.Linear(DIM, 4 * DIM, bias=False)
        self.hidden = nn.Linear(DIM, 4 * DIM, bias=False)
        self.head = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = c = x.new_zeros(x.shape[0], DIM)
        outputs = []
        for t in range(x.shape[1]):
            h, c = LSTMCellFunction.apply(self.input(x[:, t]) + self.hidden(h), c, None)
            outputs.append(h)
        return self.head(torch.stack(outputs, dim=1))


# -- training steps other than one forward and one backward ------------------------------


def backward_twice(loss_of: LossOf, model: nn.Module, batch: Batch) -> torch.Tensor:
    """``retain_graph=True``: the saved activations, offloaded ones included,
    serve a second backward (which doubles every gradient)."""
    loss = loss_of(batch)
    loss.backward(retain_graph=True)
    loss.backward()
    return loss


def accumulate_with_autograd_grad(loss_of: LossOf, model: nn.Module, batch: Batch) -> torch.Tensor:
    """Gradient accumulation: the batch in two micro-batches, the gradients of
    each taken by ``torch.autograd.grad`` and summed into ``.grad``."""
    params = [p for p in model.parameters() if p.requires_grad]
    leaves = params + [v for v in batch.values() if v.requires_grad]
    losses = []
    for half in range(2):
        loss = loss_of({k: v.chunk(2)[half] for k, v in batch.items()})
        for leaf, grad in zip(leaves, torch.autograd.grad(loss, leaves), strict=True):
            leaf.grad = grad if leaf.grad is None else leaf.grad + grad
        losses.append(loss.detach())
    return torch.stack(losses).mean()


# -- training patterns on Hugging Face models --------------------------------------------


def bf16_autocast_loss(forward: Forward, batch: Batch) -> torch.Tensor:
    """Mixed precision: matmuls in bf16, so bf16 activations are saved (and offloaded)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return forward(**batch).loss


def checkpointed_bert() -> nn.Module:
    """Hugging Face's own activation checkpointing, non-reentrant, around every
    layer of a BERT with dropout."""
    model = bert()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def lora_llama() -> nn.Module:
    """peft's LoRA on the attention projections, with LoRA dropout: the base
    model frozen, only the adapters train. Both adapter matrices start random
    (peft's default zeroes one, which would make the dropout before it and the
    other one's gradient vanish in the first step)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
    )
    return peft.get_peft_model(llama(), config)


def two_lengths_batch(i: int) -> Batch:
    """Sequence lengths 16, 24, 16: a dynamic-shape compile serves them all."""
    return causal_lm_batch(i, seq=(16, 24)[i % 2])


def is_lora(name: str) -> bool:
    return "lora_" in name


def not_whisper_encoder_positions(name: str) -> bool:
    """Whisper's encoder positions are fixed sinusoids (``requires_grad=False``)."""
    return "encoder.embed_positions" not in name


CASES = {
    # Hugging Face models.
    "llama": Case(llama, causal_lm_batch),
    "qwen2": Case(qwen2, causal_lm_batch),
    "mistral": Case(mistral, causal_lm_batch),
    "qwen2-moe": Case(qwen2_moe, causal_lm_batch),
    "bert": Case(bert, bert_batch, has_dropout=True),
    "t5": Case(t5, t5_batch, has_dropout=True),
    "whisper": Case(whisper, whisper_batch, has_dropout=True, trains=not_whisper_encoder_positions),
    "vit": Case(vit, image_batch, has_dropout=True),
    "resnet": Case(resnet, image_batch),
    "convnext": Case(convnext, image_batch, has_dropout=True),
    # Training patterns on Hugging Face models.
    "bert-gradient-checkpointing": Case(checkpointed_bert, bert_batch, has_dropout=True),
    "llama-bf16-autocast": Case(llama, causal_lm_batch, bf16_autocast_loss),
    "llama-dynamic": Case(llama, two_lengths_batch, compile_kwargs={"dynamic": True}, graphs=1),
    "llama-fullgraph": Case(llama, causal_lm_batch, compile_kwargs={"fullgraph": True}, graphs=1),
    "llama-lora": Case(lora_llama, causal_lm_batch, has_dropout=True, trains=is_lora),
    # Training patterns on toys.
    "checkpoint-dropout": Case(
        CheckpointedDropoutBlock, toy_batch, regression_loss, has_dropout=True
    ),
    "retain-graph-backward-twice": Case(
        DropoutMLP, toy_batch, regression_loss, backward_twice, has_dropout=True
    ),
    "accumulate-autograd-grad": Case(
        DropoutMLP, toy_batch, regression_loss, accumulate_with_autograd_grad, has_dropout=True
    ),
    "inplace-activations": Case(InPlaceActivations, toy_batch, regression_loss),
    "returns-intermediate-and-view": Case(ReturnsIntermediate, toy_batch, intermediate_loss),
    "lstm": Case(
        LSTMRegressor,
        rnn_batch,
        regression_loss,
        dynamo_config={"allow_rnn": True},
        has_dropout=True,
    ),
    "lstm-like-function-saves-none": Case(LSTMLike, rnn_batch, regression_loss),
}

INDUCTOR = ["llama", "qwen2-moe", "bert", "resnet", "vit"]
"""Inductor for the most common architectures only: each case compiles twice,
from scratch and on one thread (``reproducible``), in one to two minutes on
two CPU cores."""

PARAMS = [pytest.param(name, "aot_eager", id=f"{name}-aot_eager") for name in CASES] + [
    pytest.param(name, "inductor", id=f"{name}-inductor") for name in INDUCTOR
]


def assert_nothing_left(offload_dir: Path) -> None:
    """The engine holds no slot, its private directory holds only its file (and the
    lock that says it lives), and closing it (as at exit) removes that directory."""
    (engine,) = [e for e in engines() if Path(e.roots[0]).resolve() == offload_dir.resolve()]
    assert engine.live_entries() == 0
    slots_freed(engine)
    assert sorted(os.listdir(engine.drives[0].directory)) == sorted(
        [os.path.basename(engine.drives[0].file.path), LOCK_NAME]
    )
    close_all()
    assert not os.path.exists(engine.drives[0].directory)


@pytest.mark.parametrize(("name", "compiler"), PARAMS)
def test_offloaded_training_is_bitwise_the_baseline(
    name: str, compiler: str, tmp_path: Path
) -> None:
    case = CASES[name]
    model, batches = make(case, STEPS)
    if case.has_dropout:
        assert_dropout_is_active(case, model, batches[0])
    options = {"min_bytes": 0, "compiler": compiler, "offload_dir": str(tmp_path)}
    with reproducible(compiler):
        baseline = train(case, model, batches, {**options, "policy": "none"})
        offloaded = train(case, model, batches, {**options, "policy": "all"})

    assert baseline.stats.tensors_stored == 0 and baseline.stats.bytes_written == 0
    assert offloaded.stats.tensors_stored > 0 and offloaded.stats.bytes_written > 0
    assert offloaded.stats.io_errors == 0
    assert offloaded.graphs == baseline.graphs
    if case.graphs is not None:
        assert offloaded.graphs == case.graphs, "dynamo compiled more graphs than the case needs"
    assert_gradients_where_expected(case, model, baseline)
    assert_runs_equal(baseline, offloaded)
    assert_nothing_left(tmp_path)
