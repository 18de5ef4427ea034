"""Running ``train_step.py``'s configurations: each in a child process of its own
(``spawn``, ``child_main``), or all in this one (``run_interleaved``).

A child measures memory and time (``run_child``) or finds the largest
micro-batch that fits (``run_child_max_batch``) and writes its result as JSON
to the file named by ``$FXOFFLOAD_BENCH_RESULT``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch
from memory_meter import MMAP_ENV, MiB, Sampler, restore_malloc_defaults
from train_configs import SSDTRAIN, Trainer

import fxoffload

RESULT_ENV = "FXOFFLOAD_BENCH_RESULT"


def run_child(args: argparse.Namespace, name: str) -> dict:
    """Train and measure one configuration, in this (the child) process."""
    trainer = Trainer(args, name)
    idx, targets = trainer.batch(args, args.batch)
    for _ in range(args.warmup):
        trainer.step(idx, targets)
    measured = [trainer.step(idx, targets) for _ in range(min(args.steps, 3))]
    mem_times, _, peaks, held = zip(*measured, strict=True)
    result = {
        "config": name,
        "peak_mib": max(peaks) / MiB,
        "after_forward_mib": statistics.median(held) / MiB,
        "memory_step_ms": [t * 1e3 for t in mem_times],
        "memory_method": trainer.meter.method
        + (", 64 KiB mmap threshold" if trainer.exact_rss else ""),
    }
    if args.plot and name in SSDTRAIN:
        marks: dict = {}
        sampler = Sampler(trainer.meter.now)
        trainer.step(idx, targets, marks)
        start, before = marks["start"], marks["before"]
        samples = [(t, b) for t, b in sampler.stop() if t >= start]
        result["timeline"] = [((t - start) * 1e3, (b - before) / MiB) for t, b in samples]
        result["forward_end_ms"] = (marks["forward_end"] - start) * 1e3
    if trainer.exact_rss:  # back to about glibc's default once warm: mmap is slow on a VM
        restore_malloc_defaults()
        trainer.exact_rss = False
        trainer.step(idx, targets)
    before = fxoffload.stats()
    timed, cpu, io_cpu = [], [], []
    for _ in range(args.steps):
        timed.append(trainer.step(idx, targets))
        cpu.append(trainer.cpu_seconds)
        io_cpu.append(trainer.io_cpu_seconds)
    times, forward_times, _, _ = zip(*timed, strict=True)
    after = fxoffload.stats()
    result.update(
        step_ms=statistics.median(times) * 1e3,
        forward_ms=statistics.median(forward_times) * 1e3,
        offloaded_mib_per_step=(after.bytes_written - before.bytes_written) / args.steps / MiB,
        stall_ms_per_step=(after.wait_stall_ns - before.wait_stall_ns) / args.steps / 1e6,
        forwarded_per_step=(after.tensors_forwarded - before.tensors_forwarded) / args.steps,
        store_wait_ms_per_step=(after.store_wait_ns - before.store_wait_ns) / args.steps / 1e6,
        step_ms_all=[t * 1e3 for t in times],
        cpu_ms=statistics.median(cpu) * 1e3,
        io_cpu_ms_per_step=sum(io_cpu) / args.steps * 1e3,
    )
    return result


def run_interleaved(
    args: argparse.Namespace, names: list[str]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """All configurations compiled in this one process, their timed steps alternated:
    each one's step seconds and CPU seconds, step by step.

    Step times only (memory is the process's, shared). Step ``i`` of every
    configuration runs right after step ``i`` of the first, so a machine whose
    speed drifts affects both alike.
    """
    trainers = {name: Trainer(args, name) for name in names}
    idx, targets = trainers[names[0]].batch(args, args.batch)
    for trainer in trainers.values():
        for _ in range(args.warmup):
            trainer.step(idx, targets)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.steps):
        for name, trainer in trainers.items():
            times[name].append(trainer.step(idx, targets)[0])
            cpu[name].append(trainer.cpu_seconds)
    return times, cpu


def run_child_max_batch(args: argparse.Namespace, name: str) -> dict:
    """The largest micro-batch that fits ``--memory-limit-gib``, and tokens/s at it."""
    trainer = Trainer(args, name)
    limit = args.memory_limit_gib * (1 << 30) if args.memory_limit_gib else None
    if limit and trainer.device.type == "cuda":
        index = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), index)
    tries: dict[int, bool] = {}

    def dynamic_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx, targets = trainer.batch(args, size)
        torch._dynamo.mark_dynamic(idx, 0)
        torch._dynamo.mark_dynamic(targets, 0)
        return idx, targets

    def fits(size: int, steps: int = 2) -> list[float] | None:
        """Step times of ``steps`` steps at batch ``size``, or None if it does not fit."""
        idx, targets = dynamic_batch(size)
        try:
            stats = [trainer.step(idx, targets) for _ in range(steps)]
        except RuntimeError as e:  # torch.OutOfMemoryError, or it wrapped by a compiler layer
            if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):
                raise
            stats = None
        if stats is None:  # outside the except block: the failed step's frames are gone
            trainer.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
        ok = stats is not None and (limit is None or max(s[2] for s in stats) <= limit)
        print(f"    {name}: batch {size} {'fits' if ok else 'does not fit'}", flush=True)
        tries[size] = ok
        return [s[0] for s in stats] if ok else None

    trainer.step(*dynamic_batch(args.batch))  # compile first: its memory is no step's
    low, high = 0, args.batch
    while high <= args.max_batch_limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    result = {"config": name, "max_batch": low, "tries": tries, "limit_gib": args.memory_limit_gib}
    if low:
        times = fits(low, args.steps)
        if times is None:  # fitted once, not again (fragmentation): no throughput to report
            result["refit_failed"] = True
        else:
            result["step_ms"] = statistics.median(times) * 1e3
            result["tokens_per_s"] = low * args.seq_len / statistics.median(times)
    return result


def machine(device: str) -> str:
    """The GPU's name, or the CPU's model and the cores this process may use."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), "?")
    return f"{model} ({len(os.sched_getaffinity(0))} cores)"


def child_main(args: argparse.Namespace) -> None:
    """The child's part: run ``args.child``, write its result (or its error), and exit."""
    try:
        result = (run_child_max_batch if args.max_batch else run_child)(args, args.child)
    except Exception as e:
        traceback.print_exc()
        e = getattr(e, "inner_exception", None) or e  # dynamo's BackendCompilerFailed
        result = {"config": args.child, "error": f"{type(e).__name__}: {e}"}
    with open(os.environ[RESULT_ENV], "w") as f:
        json.dump(result, f)
    sys.exit(1 if "error" in result else 0)


def spawn(command: list[str], name: str, device: str, result_path: str) -> dict:
    """Run ``command`` (the script and its arguments) with ``--child name``: its result,
    or {"error": ...}."""
    env = {**os.environ, RESULT_ENV: result_path}
    if device == "cpu":  # every allocation of 64 KiB and up is mmapped, and unmapped when freed
        env.update(MMAP_ENV)
    start = time.perf_counter()
    proc = subprocess.run(  # stdout: progress lines
        [sys.executable, *command, "--child", name], env=env, stderr=subprocess.PIPE
    )
    try:
        with open(result_path) as f:
            result = json.load(f)
    except (OSError, ValueError):  # it died before writing one
        lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()]
        result = {"config": name, "error": lines[-1] if lines else f"exit {proc.returncode}"}
    return {**result, "wall_s": time.perf_counter() - start}


def run_rounds(command: list[str], args: argparse.Namespace, names: list[str]) -> list[list[dict]]:
    """Every configuration in a child of its own, all in turn, ``args.rounds`` times."""
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            results = []
            for name in names:
                print(f"  running {name} ...", file=sys.stderr, flush=True)
                path = os.path.join(tmp, f"{name}-{round_}.json")
                results.append(spawn(command, name, args.device, path))
                brief = {k: v for k, v in results[-1].items() if not isinstance(v, (list, dict))}
                print(f"  {name}: {brief}", file=sys.stderr, flush=True)
            rounds.append(results)
    return rounds
