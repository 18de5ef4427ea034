"""Peak memory and step time of a GPT training step: offloading vs the alternatives.

Each configuration trains the same GPT (fixed seed, one batch of random tokens,
SGD) in its own subprocess (this script re-invoked with ``--child``):

    none         ssdtrain backend, policy "none": the same compile, nothing offloaded
    adaptive     ssdtrain backend, policy "adaptive"
    all          ssdtrain backend, policy "all"
    recompute    checkpoint(use_reentrant=False) around each block, stock inductor
    budget-B     stock inductor, torch._functorch.config.activation_memory_budget = B
                 (B in 0, 0.1, 0.3, 0.5, 0.7)
    mb-B         ssdtrain backend, policy "adaptive", memory_budget = B (0.1 to 0.7)
    save_on_cpu  eager under torch.autograd.graph.save_on_cpu (moves nothing on CPU)

A step is zero_grad, forward (with the cross-entropy, so the logits are in the
compiled graph), backward and SGD; ``gc.collect()`` runs between steps. After
``--warmup`` steps, min(``--steps``, 3) steps measure memory above what is in use
after zero_grad (on CPU, less the engine's idle buffers: below): "peak MiB" (max
over the steps) and "after-fwd MiB", held once the loss is computed: activations
kept for backward, staging copies of offloaded ones not yet written, and idle
buffers (median). Then ``--steps`` steps are timed ("step ms": median); "offl.
MiB/step" is ``fxoffload.stats().bytes_written`` per timed step.

"stall ms/step" is the time backward's waits blocked the host on I/O not
finished in time (``fxoffload.stats().wait_stall_ns``; on a GPU the device may
still be busy meanwhile), "forwarded/step" the waits served from memory without a
read (``tensors_forwarded``); "fwd ms" the median forward time. "cpu ms" is
the process's CPU time in a step, all threads (median), "io cpu ms" that of
fxoffload's I/O threads alone (``fxoffload.stats().io_cpu_ns``, mean): on a
machine whose cores all compute, the I/O's CPU time comes out of training's.
``--autocast`` runs forward under ``torch.autocast`` in bfloat16. ``--model hf-gpt2``
trains Hugging Face's GPT-2, built from a config of the same sizes, instead.

``--rounds N`` runs every configuration N times, all of them in turn each
round, and prints medians over the rounds; each ratio is taken to the first
configuration of its own round and printed as median [min-max]. On the
development VM the speed of the whole machine drifted by a third between
processes a minute apart, which one round cannot tell from offloading's cost.

``--interleave`` trades memory figures for steadier step-time ratios: the
configurations (all but the ``budget-*`` ones, whose compiler setting is global) run in
this one process and their timed steps alternated; each step's ratio is to the
reference step just before it, and the median of those ratios is printed.

``--max-batch`` answers a different question: the largest micro-batch that
trains in ``--memory-limit-gib`` (default: the whole device), found by doubling
from ``--batch`` and then bisecting, two steps per try, with the batch
dimension dynamic so each configuration compiles once; then tokens per second
at that batch (median of ``--steps``). On CUDA a try fails when it runs out of
memory (the limit is set with ``set_per_process_memory_fraction``); on CPU,
when its peak memory (above what is in use after zero_grad) exceeds it.

On CPU memory is the process RSS. The child starts with
``MALLOC_MMAP_THRESHOLD_=65536``: glibc mmaps every allocation of 64 KiB and up
and unmaps it when freed, so RSS follows the live bytes (with glibc's default,
freed tensors stay resident and are reused: the peak would hide). Before each
memory step ``malloc_trim(0)`` returns freed heap memory and writing 5 to
``/proc/self/clear_refs`` resets the high-water mark VmHWM, read after the step;
where that reset does not work, a thread samples VmRSS every 1 ms (the output
says which). The engine's idle staging and read buffers, kept between steps for
reuse (``fxoffload.stats().staging_bytes_held``), are offloading's own memory:
a step takes its buffers from them, so they count in its peak (they are
subtracted from the RSS it is measured above). Before the timed steps
``mallopt`` puts the thresholds back near glibc's own (reuse freed blocks up to
32 MiB), since mapping fresh pages for every tensor is slow on a VM. On CUDA:
``max_memory_allocated`` after ``reset_peak_memory_stats``, and
``memory_allocated``. Ratios are to the first configuration. Run from the
repository root (2 CPU cores: about 2 minutes with a warm inductor cache, 3
cold)::

    python benchmarks/train_step.py [--configs none,all] [--option min_bytes=0] \\
        [--offload-dir /nvme/x] [--json out.json] [--plot out.png] [--autocast] \\
        [--rounds 3] [--interleave] [--max-batch --memory-limit-gib 32]

``--plot`` (``pip install '.[plot]'``) draws the memory of none, adaptive and
all over one more step, sampled every 1 ms; ``--pareto`` draws peak memory
against step time, the ``mb-*`` and ``budget-*`` configurations as curves.

The pieces: ``bench_models`` (the models), ``memory_meter`` (measuring memory),
``train_configs`` (the configurations and their training step), ``train_runs``
(the child processes and the interleaved run) and ``train_report`` (tables
and plots).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
from bench_models import GPT, MODEL, MODELS
from train_configs import CONFIGS, INTERLEAVABLE
from train_report import (
    combine,
    plot,
    plot_pareto,
    print_interleaved,
    print_max_batch,
    print_rates,
    print_table,
)
from train_runs import child_main, machine, run_interleaved, run_rounds


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    """The arguments, checked, and the configurations named by ``--configs``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, default in MODEL.items():  # --batch is the micro-batch: sequences per step
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=default)
    parser.add_argument("--model", choices=sorted(MODELS), default="gpt")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run all configurations this many times, in turn"
    )
    parser.add_argument(
        "--interleave", action="store_true", help="step times only, all configs in one process"
    )
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps (compile)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--configs",
        default="none,adaptive,all,recompute,budget-0.5,budget-0,save_on_cpu",
        help=f"comma-separated, of: {', '.join(CONFIGS)}",
    )
    parser.add_argument(
        "--offload-dir", default=os.environ.get("FXOFFLOAD_DIR") or tempfile.gettempdir()
    )
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="PNG", help="plot memory over a step (matplotlib)")
    parser.add_argument("--pareto", metavar="PNG", help="plot peak memory against step time")
    parser.add_argument("--autocast", action="store_true", help="forward in bfloat16 autocast")
    parser.add_argument(
        "--max-batch", action="store_true", help="find the largest micro-batch that fits instead"
    )
    parser.add_argument("--memory-limit-gib", type=float, help="--max-batch: memory to fit in")
    parser.add_argument("--max-batch-limit", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return args, [args.child]
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if not names or any(n not in CONFIGS for n in names):
        parser.error(f"--configs: choose from {', '.join(CONFIGS)}")
    if args.rounds < 1 or (args.max_batch and args.rounds > 1):
        parser.error("--rounds: a positive count, and 1 with --max-batch")
    if any("=" not in o for o in args.option):
        parser.error("--option takes KEY=VALUE")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("--plot needs matplotlib: pip install '.[plot]'")
    if args.interleave and (args.max_batch or any(n not in INTERLEAVABLE for n in names)):
        parser.error(f"--interleave: configurations from {', '.join(INTERLEAVABLE)} only")
    return args, names


def main() -> None:
    args, names = parse_args()
    if args.child:
        child_main(args)
    model = {key: getattr(args, key) for key in MODEL}
    with torch.device("meta"):
        params = sum(p.numel() for p in GPT(args).parameters())
    info = {"machine": machine(args.device), "torch": torch.__version__, "device": args.device}
    print(
        f"machine: {info['machine']}, torch {info['torch']}, device {args.device}, "
        f"load average {os.getloadavg()[0]:.1f}\n"
        f"model: {model}, {params / 1e6:.1f}M parameters; "
        f"{args.steps} timed steps after {args.warmup} warmup"
        + (", bfloat16 autocast" if args.autocast else ""),
        flush=True,
    )
    if args.interleave:
        print_interleaved(*run_interleaved(args, names), names[0])
        return
    rounds = run_rounds([os.path.abspath(__file__), *sys.argv[1:]], args, names)
    if args.max_batch:
        results = rounds[-1]
        print_max_batch(results, args)
    else:
        results = combine(rounds)
        print_table(results, names[0], args.rounds)
    print_rates(args.offload_dir)
    total = sum(r["wall_s"] for rnd in rounds for r in rnd)
    print(f"total {total:.0f} s; load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "model": model, "rounds": rounds}, f, indent=1)
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    if args.pareto:
        plot_pareto(results, args.pareto)
        print(f"pareto plot: {args.pareto}")


if __name__ == "__main__":
    main()
