"""Train a tiny GPT with its activations offloaded to files by fxoffload.

What it shows: ``torch.compile(model, backend="ssdtrain")`` is the whole
integration. The model is plain PyTorch (token and position embeddings,
transformer blocks with causal self-attention, MLP, LayerNorm and dropout, an
LM head); the backend, found through its entry point, writes the activations
that backward needs to files during forward and reads them back during
backward. The loss per step is what it would be without offloading; the stats
at the end show how much went to disk and came back.

The model is sized so that many saved activations exceed the default
``min_bytes`` (1 MiB) and are offloaded, yet the script runs in under a minute
on two CPU cores, compile included. The data is one fixed batch of random
tokens (nothing to download), which the model learns by heart, so the loss
falls.

Run it (after ``pip install .`` in the repository)::

    python examples/train_tiny_gpt.py
    python examples/train_tiny_gpt.py --steps 20 --offload-dir /nvme/scratch
    python examples/train_tiny_gpt.py --policy all    # every eligible activation
    python examples/train_tiny_gpt.py --policy none   # same compile, nothing offloaded

What the backend decides for it, from the repository root (``make_gpt`` is the factory)::

    python -m fxoffload explain examples.train_tiny_gpt:make_gpt -o compiler=aot_eager
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

import fxoffload

BATCH_SIZE = 24
"""With the config below: 1.5 MiB per residual-stream activation, 6 MiB per MLP hidden."""


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 512
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.n_layer)))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy, computed inside the compiled graph so
        that the logits (6 MiB at the default sizes) are offloaded too."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        logits = self.head(self.ln_f(self.blocks(x)))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def make_gpt() -> tuple[TinyGPT, tuple[torch.Tensor, torch.Tensor]]:
    """The model and its one fixed batch, ``(idx, targets)``: next-token targets are the
    inputs shifted by one. The factory ``python -m fxoffload explain`` takes."""
    torch.manual_seed(0)
    cfg = GPTConfig()
    model = TinyGPT(cfg)
    data = torch.randint(0, cfg.vocab_size, (BATCH_SIZE, cfg.block_size + 1))
    return model, (data[:, :-1], data[:, 1:])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    parser.add_argument(
        "--offload-dir",
        help="directory for the offload files (default: $FXOFFLOAD_DIR, else the temp dir)",
    )
    parser.add_argument("--compiler", choices=["inductor", "aot_eager"], default="inductor")
    parser.add_argument("--policy", choices=["adaptive", "all", "none"], default="adaptive")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model, (idx, targets) = make_gpt()
    options: dict[str, str] = {"compiler": args.compiler, "policy": args.policy}
    if args.offload_dir is not None:
        options["offload_dir"] = args.offload_dir
    compiled = torch.compile(model, backend="ssdtrain", options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    print(
        f"TinyGPT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"batch {BATCH_SIZE}x{idx.shape[1]}, compiler={args.compiler}, "
        f"policy={args.policy}"
    )
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        loss = compiled(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        note = " (includes compiling)" if step == 1 else ""
        print(f"step {step:3d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.2f} s{note}")

    stats = fxoffload.stats()
    mib = 1 << 20
    print(
        f"offloaded: {stats.tensors_stored} tensors stored, "
        f"{stats.bytes_written / mib:.1f} MiB written, {stats.bytes_read / mib:.1f} MiB read, "
        f"{stats.tensors_forwarded} tensors forwarded from memory"
    )


if __name__ == "__main__":
    main()
