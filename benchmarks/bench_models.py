"""The models the benchmarks train: a small GPT, and Hugging Face's GPT-2 of the same sizes.

``MODEL`` is the default size (``train_step.py``'s command-line defaults; what
``sizing.py`` simulates). A configuration is anything with those attributes,
such as the ``argparse.Namespace`` of ``train_step.py``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MODEL = {"layers": 4, "width": 256, "heads": 4, "seq_len": 256, "batch": 8, "vocab": 4096}


class Block(nn.Module):
    def __init__(self, cfg: argparse.Namespace) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.fc = nn.Linear(cfg.width, 4 * cfg.width)
        self.out = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: argparse.Namespace, recompute: bool = False) -> None:
        super().__init__()
        self.recompute = recompute
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.width)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.recompute else block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class HFGPT2(nn.Module):
    """Hugging Face's GPT-2 (``--model hf-gpt2``) from a config with the same sizes, SDPA
    attention, its own dropout; full recomputation is its ``gradient_checkpointing_enable``."""

    def __init__(self, cfg: argparse.Namespace, recompute: bool = False) -> None:
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # built from a config: never the network
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=cfg.vocab,
            n_positions=cfg.seq_len,
            n_embd=cfg.width,
            n_layer=cfg.layers,
            n_head=cfg.heads,
            attn_implementation="sdpa",
        )
        self.model = GPT2LMHeadModel(config)
        if recompute:
            self.model.gradient_checkpointing_enable({"use_reentrant": False})

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx, labels=targets).loss


MODELS = {"gpt": GPT, "hf-gpt2": HFGPT2}
