"""Hugging Face models from tiny configs, and the training run that compares them.

Shared by ``test_hf_models.py`` and ``test_zoo.py``. A :class:`Case` is a
model factory, a batch factory and how one training step computes its loss
and gradients; :func:`train` runs a case's steps, compiled with the
``ssdtrain`` backend (or eagerly), and records what they produced.

Every model is built from a config (no download, no hub access), with
dropout on where the architecture has it, so that a bitwise comparison also
covers the replay of random masks.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from training_runs import Run

import fxoffload

# Before transformers is imported: it reads these once. The models below are
# built from configs, so any attempt to reach the hub is a bug to fail on, not
# a download to wait for.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

transformers = pytest.importorskip(
    "transformers", reason="needs transformers (pip install 'fxoffload[hf]')"
)

SEED = 0
BATCH, SEQ, VOCAB = 4, 32, 256
IMAGE, LABELS = 32, 10
CLASSIFIER = {"num_labels": LABELS, "problem_type": "single_label_classification"}
"""Said rather than inferred: the first forward would set ``problem_type`` on the
config, and dynamo recompile the second."""

Batch = dict[str, torch.Tensor]
Forward = Callable[..., Any]
"""The model as a step calls it: compiled, or the module itself when eager."""
LossOf = Callable[[Batch], torch.Tensor]
"""The loss of one batch: a forward through the model under test."""


def hf_loss(forward: Forward, batch: Batch) -> torch.Tensor:
    """A Hugging Face model computes its loss itself when given labels."""
    return forward(**batch).loss


def every_parameter(name: str) -> bool:
    return True


def backward(loss_of: LossOf, model: nn.Module, batch: Batch) -> torch.Tensor:
    """The plain training step: one forward, one backward."""
    loss = loss_of(batch)
    loss.backward()
    return loss


@dataclasses.dataclass(frozen=True)
class Case:
    """A model, its batches, and how one training step computes loss and gradients."""

    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int], Batch]
    """The batch of step ``i`` (most cases ignore ``i``). Float tensors that
    require grad are inputs whose gradients are compared too."""
    loss: Callable[[Forward, Batch], torch.Tensor] = hf_loss
    step: Callable[[LossOf, nn.Module, Batch], torch.Tensor] = backward
    """One training step: leaves the gradients in ``.grad`` and returns the loss."""
    compile_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """More arguments of ``torch.compile`` (``dynamic``, ``fullgraph``)."""
    dynamo_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """``torch._dynamo.config`` settings for the run (``allow_rnn``)."""
    has_dropout: bool = False
    """The case relies on random masks (dropout, drop path): checked to be active."""
    graphs: int | None = None
    """How many graphs dynamo must compile over the whole run, where that is the point."""
    trains: Callable[[str], bool] = every_parameter
    """Which parameters, by name, get a gradient; the others must get none."""


@dataclasses.dataclass
class ZooRun(Run):
    graphs: int = 0
    """Graphs dynamo compiled during the run (a graph break or recompile adds one)."""


def make(case: Case, steps: int) -> tuple[nn.Module, list[Batch]]:
    """The case's model and batches, the same on every call."""
    torch.manual_seed(SEED)
    model = case.make_model()
    return model, [case.make_batch(i) for i in range(steps)]


def fresh_inputs(batch: Batch) -> Batch:
    """A copy of ``batch`` whose inputs that require grad are new leaves without a grad."""
    return {
        k: v.detach().clone().requires_grad_() if v.requires_grad else v for k, v in batch.items()
    }


def train(case: Case, model: nn.Module, batches: list[Batch], options: dict | None) -> ZooRun:
    """Train a copy of ``model`` in training mode (dropout on): eagerly if
    ``options`` is None, else compiled with the ``ssdtrain`` backend.

    The seed is set right before the first step, so every run draws the same
    dropout masks, step by step. Each step's graph must be gone after it,
    and with it every handle to an offloaded tensor.
    """
    torch._dynamo.reset()
    model = copy.deepcopy(model).train()
    forward = model
    if options is not None:
        forward = torch.compile(model, backend="ssdtrain", options=options, **case.compile_kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    gc.collect()
    handles_before = fxoffload.stats().handles_live
    graphs_before = counters["stats"]["unique_graphs"]
    torch.manual_seed(SEED)
    fxoffload.reset_stats()
    run = ZooRun()
    with torch._dynamo.config.patch(**case.dynamo_config):
        for i, batch in enumerate(batches):
            batch = fresh_inputs(batch)
            loss = case.step(lambda b: case.loss(forward, b), model, batch)
            run.losses.append(loss.detach())
            grads = {n: p.grad for n, p in model.named_parameters()}
            grads |= {f"input {k}": v.grad for k, v in batch.items() if v.requires_grad}
            run.grads.append({n: None if g is None else g.clone() for n, g in grads.items()})
            optimizer.step()
            optimizer.zero_grad()
            del loss, batch
            gc.collect()
            # The step's graph is gone: every handle it held was released.
            assert fxoffload.stats().handles_live == handles_before, f"step {i}: handles held"
    run.final_state = {k: v.clone() for k, v in model.state_dict().items()}
    run.stats = fxoffload.stats()
    run.graphs = counters["stats"]["unique_graphs"] - graphs_before
    return run


def assert_dropout_is_active(case: Case, model: nn.Module, batch: Batch) -> None:
    """A bitwise comparison covers the replay of random masks only if there are
    some: two seeds must give two losses (eager, one forward, cheap)."""
    model = copy.deepcopy(model).train()
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with torch.no_grad():
            losses.append(case.loss(model, batch))
    assert not torch.equal(*losses), "the model draws no random mask in training mode"


def assert_gradients_where_expected(case: Case, model: nn.Module, run: Run) -> None:
    """Exactly the parameters the case trains, and every input that requires
    grad, got a gradient at every step: comparing Nones would prove nothing."""
    expected = {n for n, _ in model.named_parameters() if case.trains(n)}
    for step, grads in enumerate(run.grads):
        got = {n for n, g in grads.items() if g is not None}
        inputs = {n for n in grads if n.startswith("input ")}
        assert got == expected | inputs, f"step {step}: gradients of {sorted(got ^ expected)}"


# -- language models: decoders ---------------------------------------------------------


def gpt2(attn_implementation: str = "eager") -> nn.Module:
    """Decoder only, Conv1D projections, and an LM head tied to the token
    embedding. Eager attention is matmul, causal mask, softmax and attention
    dropout; "sdpa" is one fused op (and compiles faster under inductor)."""
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn_implementation,
    )
    return transformers.GPT2LMHeadModel(config)


def gpt2_batch(i: int) -> Batch:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    return {"input_ids": ids, "labels": ids}  # the model shifts labels itself


def causal_lm_batch(i: int, seq: int = SEQ) -> Batch:
    """Right padding on one row, whose padded positions are not predicted."""
    ids = torch.randint(1, VOCAB, (BATCH, seq))
    mask = torch.ones(BATCH, seq, dtype=torch.long)
    mask[0, seq - 4 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


LLAMA_LIKE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention
    "max_position_embeddings": 64,
    "attn_implementation": "sdpa",
}
"""The shared shape of the Llama family: RoPE, RMSNorm, SwiGLU MLP and GQA
attention with SDPA; no dropout, as these models are trained (their configs'
default)."""


def llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_LIKE))


def qwen2() -> nn.Module:
    """Llama with biases on the q, k and v projections."""
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**LLAMA_LIKE))


def mistral() -> nn.Module:
    """Llama with sliding-window attention, the window shorter than the sequence."""
    config = transformers.MistralConfig(**LLAMA_LIKE, sliding_window=SEQ // 2)
    return transformers.MistralForCausalLM(config)


def qwen2_moe() -> nn.Module:
    """Mixture of experts: a top-2 router over 4 experts (whose weights are
    3-D parameters indexed by expert), a gated shared expert, and the router's
    load-balancing loss added to the LM loss."""
    config = transformers.Qwen2MoeConfig(
        **LLAMA_LIKE,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
    )
    return transformers.Qwen2MoeForCausalLM(config)


# -- language models: encoders and encoder-decoders ------------------------------------


def bert() -> nn.Module:
    """Encoder only with SDPA attention: a padding mask becomes an additive
    bias, and the fused op's dropout must replay."""
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    return transformers.BertForMaskedLM(config)


def bert_batch(i: int) -> Batch:
    ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1:, SEQ - 8 :] = 0  # three padded sequences
    # Masked LM: predict 15% of the real tokens, ignore the rest (-100).
    predict = (torch.rand(BATCH, SEQ) < 0.15) & mask.bool()
    predict[:, 0] = True  # at least one target per row
    labels = torch.where(predict, ids, -100)
    return {"input_ids": ids.masked_fill(predict, 0), "attention_mask": mask, "labels": labels}


def t5() -> nn.Module:
    """Encoder-decoder: relative position buckets, RMS-style layer norm,
    cross-attention, and shared embeddings."""
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        attn_implementation="eager",
    )
    return transformers.T5ForConditionalGeneration(config)


def t5_batch(i: int) -> Batch:
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, SEQ // 2 :] = 0
    return {
        "input_ids": torch.randint(1, VOCAB, (BATCH, SEQ)),
        "attention_mask": mask,
        "labels": torch.randint(1, VOCAB, (BATCH, SEQ // 2)),
    }


MEL_BINS, FRAMES = 16, 32


def whisper() -> nn.Module:
    """Speech encoder-decoder: two 1-D convolutions over mel features, sinusoidal
    (frozen) encoder positions, learned decoder positions, cross-attention,
    dropout everywhere, and an LM head tied to the decoder's embedding."""
    config = transformers.WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=MEL_BINS,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=FRAMES // 2,  # the encoder's second conv has stride 2
        max_target_positions=SEQ,
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        begin_suppress_tokens=None,
        attn_implementation="sdpa",
    )
    return transformers.WhisperForConditionalGeneration(config)


def whisper_batch(i: int) -> Batch:
    return {
        "input_features": torch.randn(BATCH, MEL_BINS, FRAMES).requires_grad_(),
        "labels": torch.randint(3, VOCAB, (BATCH, SEQ // 2)),
    }


# -- vision ----------------------------------------------------------------------------


def image_batch(i: int) -> Batch:
    return {
        "pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE).requires_grad_(),
        "labels": torch.randint(0, LABELS, (BATCH,)),
    }


def vit() -> nn.Module:
    """Patch embedding (a strided conv), a class token, learned positions, and
    a pre-norm encoder with SDPA attention and dropout."""
    config = transformers.ViTConfig(
        image_size=IMAGE,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        attn_implementation="sdpa",
        **CLASSIFIER,
    )
    return transformers.ViTForImageClassification(config)


def resnet() -> nn.Module:
    """Convolutions, BatchNorm (running statistics: buffers forward updates),
    ReLU, max-pooling, shortcut projections and adaptive average pooling."""
    config = transformers.ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        **CLASSIFIER,
    )
    return transformers.ResNetForImageClassification(config)


def convnext() -> nn.Module:
    """Depthwise 7x7 convolutions, channels-last LayerNorm (permutes), layer
    scale, and stochastic depth (drop path: random per sample)."""
    config = transformers.ConvNextConfig(
        num_stages=2,
        hidden_sizes=[16, 32],
        depths=[2, 2],
        patch_size=4,
        image_size=IMAGE,
        drop_path_rate=0.2,
        # The default scale (1e-6) keeps the residual branches too small for a
        # dropped path to change the loss at all.
        layer_scale_init_value=1.0,
        **CLASSIFIER,
    )
    return transformers.ConvNextForImageClassification(config)
