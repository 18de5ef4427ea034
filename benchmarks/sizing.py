"""When does offloading to SSD pay? Llama shapes on an H100 with 1, 4 and 8 NVMe drives.

For Llama-2's 7B, 13B and 70B shapes (sequence 4096, micro-batch 1, bfloat16,
causal ``scaled_dot_product_attention``, grouped-query attention for 70B),
``fxoffload.simulate`` plans a training step on an H100 (datasheet rates,
``fxoffload/hardware.py``) with 1, 4 and 8 drives of ``--drive-gbps`` each and
prints a markdown table (``--flops-fraction`` scales the FLOP rates down to a
training run's utilization): the fraction of the saved-activation bytes that
adaptive offloading hides, its predicted step time against policy "none", what
it writes per step, and how many days a drive rated ``--tbw`` terabytes written
lasts at that rate.

The model is built on the meta device (nothing is allocated) with
``--layers`` decoder layers of the real width between the real embedding, final
norm, LM head and loss. A full-depth run (``--layers 0``) is the default for
honesty: keep-last and the time forward leaves for writing depend on depth, so
a few layers cannot be scaled to many without changing the answer. Run from
the repository root::

    python benchmarks/sizing.py [--layers 0] [--drive-gbps 7] [--tbw 3500] [--models 7b,13b,70b] \\
        [--flops-fraction 1.0]

``benchmark_gpt`` is a factory for the simulator's own command, to predict
``train_step.py``'s GPT with a machine's measured rates::

    PYTHONPATH=benchmarks python -m fxoffload simulate sizing:benchmark_gpt \\
        --flops 0.30 --memory-bw 89 --disk 1.64 --disk-read 1.53
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import fxoffload
from fxoffload.hardware import PRESETS, preset


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    """Llama-2's published configuration (``config.json`` of each model)."""

    width: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int = 32000


SHAPES = {
    "7b": LlamaShape(width=4096, layers=32, heads=32, kv_heads=32, ffn=11008),
    "13b": LlamaShape(width=5120, layers=40, heads=40, kv_heads=40, ffn=13824),
    "70b": LlamaShape(width=8192, layers=80, heads=64, kv_heads=8, ffn=28672),
}
SEQ_LEN = 4096
DRIVES = (1, 4, 8)


class RMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
        return self.weight * normed.type_as(x)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, as Llama's ``apply_rotary_pos_emb``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LlamaLayer(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.heads, s.kv_heads, s.width // s.heads
        self.attn_norm, self.mlp_norm = RMSNorm(s.width), RMSNorm(s.width)
        self.q = nn.Linear(s.width, s.width, bias=False)
        self.kv = nn.Linear(s.width, 2 * s.kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(s.width, s.width, bias=False)
        self.gate_up = nn.Linear(s.width, 2 * s.ffn, bias=False)
        self.down = nn.Linear(s.ffn, s.width, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.attn_norm(x)
        q = self.q(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads
        )
        x = x + self.o(y.transpose(1, 2).reshape(b, t, c))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Llama(nn.Module):
    def __init__(self, s: LlamaShape, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(s.vocab, s.width)
        self.layers = nn.ModuleList(LlamaLayer(s) for _ in range(layers))
        self.norm = RMSNorm(s.width)
        self.head = nn.Linear(s.width, s.vocab, bias=False)
        head_dim = s.width // s.heads
        freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(SEQ_LEN).float(), freqs).repeat(1, 2)
        self.register_buffer("cos", angles.cos().to(torch.bfloat16), persistent=False)
        self.register_buffer("sin", angles.sin().to(torch.bfloat16), persistent=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        logits = self.head(self.norm(x)).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def benchmark_gpt() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """``train_step.py``'s default GPT and batch, on the meta device: a factory for
    ``python -m fxoffload simulate`` (with ``benchmarks`` on ``PYTHONPATH``)."""
    from bench_models import GPT, MODEL

    cfg = argparse.Namespace(**MODEL)
    with torch.device("meta"):
        model = GPT(cfg)
        data = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq_len + 1))
    return model, (data[:, :-1], data[:, 1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=0, help="0: each model's own depth")
    parser.add_argument("--drive-gbps", type=float, default=7.0)
    parser.add_argument("--tbw", type=float, default=3500.0, help="each drive's rating")
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--drives", default=",".join(map(str, DRIVES)), help="drive counts")
    parser.add_argument(
        "--flops-fraction",
        type=float,
        default=1.0,
        help="the FLOP rates as this fraction of the datasheet's (a model FLOP utilization)",
    )
    args = parser.parse_args()

    h100 = PRESETS["h100"]
    print(
        f"| model | layers | drives | saved activations GiB | hidden by adaptive | "
        f"step vs none | written GB/step | days to {args.tbw:g} TBW |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        shape = SHAPES[name]
        layers = args.layers or shape.layers
        with torch.device("meta"):
            model = Llama(shape, layers).to(torch.bfloat16)
            idx = torch.randint(0, shape.vocab, (1, SEQ_LEN))
        for drives in map(int, args.drives.split(",")):
            hardware = preset(
                "h100",
                flops_per_s=h100.flops_per_s * args.flops_fraction,
                flops_per_s_32bit=h100.flops_per_s_32bit * args.flops_fraction,
                disk_write_bytes_per_s=(args.drive_gbps * 1e9,) * drives,
            )
            sim = fxoffload.simulate(
                model, idx, idx, hardware=hardware, policies=("none", "adaptive"), budgets=()
            )
            none, adaptive = sim.predictions["none"], sim.predictions["adaptive"]
            wear = sim.wear("adaptive", args.tbw)
            print(
                f"| {name} | {layers} | {drives} x {args.drive_gbps:g} GB/s "
                f"| {none.activation_bytes / 2**30:.1f} | {adaptive.offloaded_fraction:.0%} "
                f"| {adaptive.step_seconds / none.step_seconds:.3f} "
                f"| {adaptive.bytes_written / 1e9:.2f} | {wear.days:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
