"""Train a small Hugging Face GPT-2 with its activations offloaded to files by fxoffload.

What it shows: a ``transformers`` model needs nothing special. The model is
built from a ``GPT2Config`` (nothing is downloaded: the hub is switched off
below) and trained on one fixed batch of random tokens, which it learns by
heart, so the loss falls. ``torch.compile(..., backend="ssdtrain")`` writes
the activations that backward needs to files during forward and reads them
back during backward; the summary at the end says how much of the saved
activations went to disk per step and how much stayed in memory, from the
backend's own decisions (``fxoffload.explain``) and its I/O counters
(``fxoffload.stats``).

The default sizes make most saved activations exceed the default
``min_bytes`` (1 MiB), yet the script runs in about a minute on two CPU cores
with inductor, compiles included.

Run it (after ``pip install '.[hf]'`` in the repository; tqdm, if installed,
draws a progress bar)::

    python examples/train_hf_gpt2.py
    python examples/train_hf_gpt2.py --steps 50 --offload-dir /nvme/scratch
    python examples/train_hf_gpt2.py --compiler aot_eager --layers 4 --hidden 256
    python examples/train_hf_gpt2.py --policy all    # every eligible activation
    python examples/train_hf_gpt2.py --policy none   # same compile, nothing offloaded
"""

from __future__ import annotations

import argparse
import os
import time

# Before transformers is imported: the model comes from a config, so nothing
# should ever try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import fxoffload  # noqa: E402
from fxoffload.passes.saved import SavedKind  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # optional: plain per-step lines instead
    tqdm = None

MIB = 1 << 20


class CausalLMLoss(nn.Module):
    """GPT-2 plus its loss, taking the token ids alone (as labels too: GPT-2 shifts them).

    Compiling this wrapper, for training and for ``explain`` alike, puts the
    loss in the graph, so the logits, the largest activation, are offloaded too.
    """

    def __init__(self, model: GPT2LMHeadModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, labels=input_ids).loss


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    parser.add_argument(
        "--offload-dir",
        help="directory for the offload files (default: $FXOFFLOAD_DIR, else the temp dir)",
    )
    parser.add_argument("--compiler", choices=["inductor", "aot_eager"], default="inductor")
    parser.add_argument("--policy", choices=["adaptive", "all", "none"], default="adaptive")
    parser.add_argument(
        "--min-bytes",
        type=int,
        default=fxoffload.config.min_bytes,
        help="offload saved tensors of at least this size (default %(default)s)",
    )
    model = parser.add_argument_group("model and batch size")
    model.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    model.add_argument("--hidden", type=int, default=128, help="embedding width (default 128)")
    model.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    model.add_argument("--vocab", type=int, default=512, help="vocabulary size (default 512)")
    model.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    model.add_argument("--batch", type=int, default=16, help="sequences per batch (default 16)")
    model.add_argument(
        "--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation"
    )
    return parser.parse_args()


def build_model(args: argparse.Namespace) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.seq,
        n_embd=args.hidden,
        n_layer=args.layers,
        n_head=args.heads,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=args.attn,
    )
    return GPT2LMHeadModel(config).train()  # dropout on, as in real training


def summarize(explanation: fxoffload.Explanation, written_per_step: float) -> str:
    """What stayed in memory and what went to disk, per training step.

    Only activations count: saved parameters and inputs are kept (they are
    alive anyway, offloading would save nothing). Bytes written are a little
    more than the offloaded activations: each file slot is padded to 4 KiB.
    """
    activations = [d for d in explanation.decisions if d.kind is SavedKind.ACTIVATION]
    # A view rebuilt from a base shares its bytes: count the base once.
    total = sum(d.nbytes for d in activations if d.rebuilt_from is None)
    offloaded = sum(d.bytes_written for d in activations)
    others = sum(d.nbytes for d in explanation.decisions if d.kind is not SavedKind.ACTIVATION)
    share = f" ({100 * offloaded / total:.0f}%)" if total else ""
    return "\n".join(
        [
            f"{offloaded / MIB:.1f} MiB of {total / MIB:.1f} MiB saved activations "
            f"offloaded per step{share}; {(total - offloaded) / MIB:.1f} MiB stayed resident "
            f"({sum(not d.offload for d in activations)} of {len(activations)} tensors)",
            f"also saved, and resident anyway: {others / MIB:.1f} MiB of parameters and inputs",
            f"written to offload files: {written_per_step / MIB:.1f} MiB per step",
        ]
    )


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model = build_model(args)
    loss_of = CausalLMLoss(model)
    options: dict[str, str | int] = {
        "compiler": args.compiler,
        "policy": args.policy,
        "min_bytes": args.min_bytes,
    }
    if args.offload_dir is not None:
        options["offload_dir"] = args.offload_dir
    compiled = torch.compile(loss_of, backend="ssdtrain", options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq))

    print(
        f"GPT-2: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{args.layers} layers, batch {args.batch}x{args.seq}, attention {args.attn}, "
        f"compiler={args.compiler}, policy={args.policy}, min_bytes={args.min_bytes}"
    )
    fxoffload.reset_stats()
    written: list[int] = []
    steps = range(1, args.steps + 1)
    bar = tqdm(steps, desc="training", unit="step") if tqdm is not None else None
    for step in bar if bar is not None else steps:
        start = time.perf_counter()
        before = fxoffload.stats().bytes_written
        loss = compiled(input_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        written.append(fxoffload.stats().bytes_written - before)
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        else:
            note = " (includes compiling)" if step == 1 else ""
            seconds = time.perf_counter() - start
            print(f"step {step:3d}  loss {loss.item():.4f}  {seconds:6.2f} s{note}")
    if bar is not None:
        bar.close()
        print(f"final loss {loss.item():.4f}")

    stats = fxoffload.stats()
    print(
        f"I/O over {args.steps} steps: {stats.tensors_stored} tensors stored, "
        f"{stats.bytes_written / MIB:.1f} MiB written, {stats.bytes_read / MIB:.1f} MiB read, "
        f"{stats.tensors_forwarded} tensors forwarded from memory, {stats.io_errors} I/O errors"
    )
    # One more compile (reusing the kernels just built) and forward, to see
    # the decisions; its writes are released when explain returns.
    explanation = fxoffload.explain(loss_of, input_ids, options=options)
    print(summarize(explanation, sum(written) / len(written) if written else 0.0))


if __name__ == "__main__":
    main()
