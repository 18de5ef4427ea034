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
fxoffload's I/O threads alone (mean; Linux): on a machine whose cores all
compute, the I/O's CPU time comes out of training's.
``--autocast`` runs forward under ``torch.autocast`` in bfloat16. ``--model hf-gpt2``
trains Hugging Face's GPT-2, built from a config of the same sizes, instead.

``--rounds N`` runs every configuration N times, all of them in turn each
round, and prints medians over the rounds; each ratio is taken to the first
configuration of its own round and printed as median [min-max]. On the
development VM the speed of the whole machine drifted by a third between
processes a minute apart, which one round cannot tell from offloading's cost.

``--interleave`` trades memory figures for steadier step-time ratios: the
configurations (all but the ``budget-*`` ones, which set a global config) run in
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
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MiB = 1 << 20
FRACTIONS = (0.1, 0.3, 0.5, 0.7)
BUDGETS = {"budget-0": 0.0, **{f"budget-{b}": b for b in FRACTIONS}}
MEMORY_BUDGETS = {f"mb-{b}": b for b in FRACTIONS}
CONFIGS = ("none", "adaptive", "all", "recompute", *BUDGETS, *MEMORY_BUDGETS, "save_on_cpu")
SSDTRAIN = ("none", "adaptive", "all", *MEMORY_BUDGETS)
MODEL = {"layers": 4, "width": 256, "heads": 4, "seq_len": 256, "batch": 8, "vocab": 4096}
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
libc = ctypes.CDLL(None)


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


class Sampler(threading.Thread):
    """Calls ``read()`` about every millisecond until stopped: [(perf_counter, bytes)]."""

    def __init__(self, read) -> None:
        super().__init__(daemon=True)
        self.read, self.samples, self.done = read, [], threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.perf_counter(), self.read()))
            time.sleep(0.001)

    def stop(self) -> list[tuple[float, int]]:
        self.done.set()
        self.join()
        return self.samples


def io_thread_cpu_seconds() -> float:
    """CPU time used so far by fxoffload's I/O threads (Linux ``/proc``; 0 elsewhere)."""
    ticks = 0
    for thread in threading.enumerate():
        if thread.name.startswith("fxoffload-io"):
            try:
                with open(f"/proc/self/task/{thread.native_id}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended, or no /proc
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def vm_status(key: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith(key + ":")).split()[1]) * 1024


class Meter:
    """Bytes in use now, and the peak since ``reset_peak``: RSS on CPU, allocated on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda, self.sampler = device.type == "cuda", None
        self.hwm = not self.cuda and self._clear_refs_works()
        self.method = (
            "cuda max_memory_allocated" if self.cuda
            else "VmHWM after clear_refs" if self.hwm
            else "VmRSS sampled every 1 ms (clear_refs does not reset VmHWM here)"
        )  # fmt: skip

    def _clear_refs_works(self) -> bool:
        torch.ones(64 * MiB // 4)  # VmHWM now >= 64 MiB above VmRSS
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return vm_status("VmHWM") - vm_status("VmRSS") < 16 * MiB

    def now(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def baseline(self) -> int:
        """What a step's memory is measured above: in use now, less offloading's idle buffers.

        On CPU the engine keeps staging and read buffers between steps (up to
        ``staging_pool_bytes``) and a step takes its buffers from them, so a
        peak taken above the RSS alone would leave that memory out.
        """
        import fxoffload

        return self.now() - (0 if self.cuda else fxoffload.stats().staging_bytes_held)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif self.hwm:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        else:
            self.sampler = Sampler(self.now)

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return vm_status("VmHWM") if self.hwm else max(b for _, b in self.sampler.stop())


def parse_value(text: str):
    """An ``--option`` value: true/false, an int, a float, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


class Trainer:
    """One configuration's model, optimizer and compiled forward, and its training step."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        import fxoffload

        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
        self.device = device = torch.device(args.device)
        torch.manual_seed(0)
        self.model = MODELS[args.model](args, recompute=name == "recompute").to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-2)
        self.contexts = [
            lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast)
        ]
        if name in SSDTRAIN:
            options = {"policy": name, "offload_dir": args.offload_dir}
            if name in MEMORY_BUDGETS:
                options.update(policy="adaptive", memory_budget=MEMORY_BUDGETS[name])
            options.update((k, parse_value(v)) for k, v in (o.split("=", 1) for o in args.option))
            fxoffload.Options.from_dict(options)  # a bad option fails here, not inside dynamo
            self.forward = torch.compile(self.model, backend="ssdtrain", options=options)
        elif name == "save_on_cpu":
            self.forward = self.model
            pin = device.type == "cuda"
            self.contexts.append(lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin))
        else:
            torch._functorch.config.activation_memory_budget = BUDGETS.get(name, 1.0)
            self.forward = torch.compile(self.model)
        self.meter = Meter(device)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        # RSS follows the live bytes while the child runs with MALLOC_MMAP_THRESHOLD_ (see spawn)
        self.exact_rss = os.environ.get("MALLOC_MMAP_THRESHOLD_") == "65536" and hasattr(
            libc, "mallopt"
        )

    def batch(self, args: argparse.Namespace, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` sequences of random tokens: inputs and targets."""
        data = torch.randint(0, args.vocab, (size, args.seq_len + 1), device=self.device)
        return data[:, :-1], data[:, 1:]

    def step(self, idx, targets, marks: dict | None = None) -> tuple[float, float, int, int]:
        """One training step: its seconds, forward seconds, peak bytes, bytes held after forward."""
        gc.collect()
        if self.exact_rss:
            libc.malloc_trim(0)  # heap memory freed earlier goes back to the OS
        self.sync()
        cpu_start, io_start = time.process_time(), io_thread_cpu_seconds()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.meter.reset_peak()
        before = self.meter.baseline()
        with contextlib.ExitStack() as stack:
            for context in self.contexts:
                stack.enter_context(context())
            loss = self.forward(idx, targets)
        after_forward = self.meter.now() - before
        self.sync()
        forward_end = time.perf_counter()
        loss.backward()
        self.optimizer.step()
        self.sync()
        seconds = time.perf_counter() - start
        self.cpu_seconds = time.process_time() - cpu_start
        self.io_cpu_seconds = io_thread_cpu_seconds() - io_start
        if marks is not None:
            marks.update(start=start, forward_end=forward_end, before=before)
        return seconds, forward_end - start, self.meter.peak() - before, after_forward


def run_child(args: argparse.Namespace, name: str) -> dict:
    """Train and measure one configuration, in this (the child) process."""
    import fxoffload

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
    if (
        trainer.exact_rss
    ):  # back to about glibc's default once warm: reuse freed memory up to 32 MiB
        libc.mallopt(M_MMAP_THRESHOLD, 32 * MiB)
        libc.mallopt(M_TRIM_THRESHOLD, 64 * MiB)
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


INTERLEAVABLE = (*SSDTRAIN, "recompute", "save_on_cpu")  # no global config of their own


def run_interleaved(args: argparse.Namespace, names: list[str]) -> None:
    """All configurations compiled in this one process, their steps alternated.

    Step times only (memory is the process's, shared). Each ratio pairs a step
    with the reference's step just before it, so a machine whose speed drifts
    affects both alike; the median of those paired ratios is printed.
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
    reference = times[names[0]]
    print(f"{args.steps} alternated steps in one process; ratios paired with {names[0]}'s step")
    print("{:<12} {:>8} {:>17} {:>7}".format("config", "step ms", "ratio", "cpu ms"))
    for name in names:
        paired = [t / ref for t, ref in zip(times[name], reference, strict=True)]
        print(
            f"{name:<12} {statistics.median(times[name]) * 1e3:>8.0f} "
            f"{ratio_text(paired):>17} {statistics.median(cpu[name]) * 1e3:>7.0f}"
        )


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
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), "?")
    return f"{model} ({len(os.sched_getaffinity(0))} cores)"


def spawn(name: str, device: str, result_path: str) -> dict:
    """Run this script for one configuration: its result, or {"error": ...}."""
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", name]
    env = {**os.environ, "FXOFFLOAD_BENCH_RESULT": result_path}
    if device == "cpu":  # every allocation of 64 KiB and up is mmapped, and unmapped when freed
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, stderr=subprocess.PIPE)  # stdout: progress lines
    try:
        with open(result_path) as f:
            result = json.load(f)
    except (OSError, ValueError):  # it died before writing one
        lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()]
        result = {"config": name, "error": lines[-1] if lines else f"exit {proc.returncode}"}
    return {**result, "wall_s": time.perf_counter() - start}


def combine(rounds: list[list[dict]]) -> list[dict]:
    """One row per configuration over the rounds: the median of each figure, and
    the ratios of step time and peak to the first configuration of the same
    round (the machine's speed drifts between rounds more than within one).

    A configuration that failed in any round shows that round's error.
    """
    rows = []
    for runs in zip(*rounds, strict=True):
        failed = [run for run in runs if "error" in run]
        if failed:
            rows.append(failed[0])
            continue
        medians = {
            key: statistics.median(run[key] for run in runs)
            for key, value in runs[0].items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        row = {**runs[-1], **medians}
        refs = [rnd[0] for rnd in rounds]
        if not any("error" in ref for ref in refs):
            for key in ("step_ms", "peak_mib"):
                row[key + "_ratios"] = [
                    run[key] / ref[key] for run, ref in zip(runs, refs, strict=True)
                ]
        rows.append(row)
    return rows


def ratio_text(ratios: list[float] | None) -> str:
    """``median`` of one or more ratios, with ``[min-max]`` when there are several."""
    if not ratios:
        return "-"
    text = f"{statistics.median(ratios):.2f}"
    return text + (f" [{min(ratios):.2f}-{max(ratios):.2f}]" if len(ratios) > 1 else "")


def print_table(results: list[dict], reference: str, rounds: int) -> None:
    methods = {r["memory_method"] for r in results if "memory_method" in r}
    print(f"memory: {', '.join(sorted(methods)) or '?'}; ratios are to {reference}", end="")
    print(f" in the same round, median [range] of {rounds} rounds" if rounds > 1 else "")
    width = 17 if rounds > 1 else 6
    header = (
        "config", "step ms", "ratio", "fwd ms", "cpu ms", "peak MiB", "ratio",
        "after-fwd MiB", "offl. MiB/step", "stall ms/step", "forwarded/step", "io cpu ms",
    )  # fmt: skip
    print(
        f"{{:<12}} {{:>8}} {{:>{width}}} {{:>7}} {{:>7}} {{:>9}} {{:>{width}}} {{:>14}} "
        "{:>15} {:>14} {:>14} {:>10}".format(*header)
    )
    for r in results:
        if "error" in r:
            print(f"{r['config']:<12} failed: {r['error'].splitlines()[0]}")
            continue
        step_ratio = ratio_text(r.get("step_ms_ratios"))
        peak_ratio = ratio_text(r.get("peak_mib_ratios"))
        ours = r["config"] in SSDTRAIN
        offloaded = f"{r['offloaded_mib_per_step']:.0f}" if ours else "-"
        stall = f"{r['stall_ms_per_step']:.1f}" if ours else "-"
        forwarded = f"{r['forwarded_per_step']:.0f}" if ours else "-"
        io_cpu = f"{r['io_cpu_ms_per_step']:.0f}" if ours else "-"
        print(
            f"{r['config']:<12} {r['step_ms']:>8.0f} {step_ratio:>{width}} "
            f"{r['forward_ms']:>7.0f} {r['cpu_ms']:>7.0f} {r['peak_mib']:>9.0f} "
            f"{peak_ratio:>{width}} {r['after_forward_mib']:>14.0f} {offloaded:>15} "
            f"{stall:>14} {forwarded:>14} {io_cpu:>10}"
        )


def print_max_batch(results: list[dict], args: argparse.Namespace) -> None:
    limit = f"{args.memory_limit_gib:g} GiB" if args.memory_limit_gib else "the whole device"
    print(f"largest micro-batch that trains in {limit} (sequence {args.seq_len}):")
    print("{:<12} {:>10} {:>8} {:>10}".format("config", "max batch", "step ms", "tokens/s"))
    for r in results:
        if "error" in r:
            print(f"{r['config']:<12} failed: {r['error'].splitlines()[0]}")
        elif "tokens_per_s" not in r:
            print(f"{r['config']:<12} {r['max_batch']:>10} (did not fit again when timed)")
        else:
            print(
                f"{r['config']:<12} {r['max_batch']:>10} {r['step_ms']:>8.0f} "
                f"{r['tokens_per_s']:>10.0f}"
            )


def print_rates(offload_dir: str) -> None:
    """The device rates the adaptive planner used, as measured and cached by fxoffload
    (the disk's: those of the file system of ``offload_dir``)."""
    from fxoffload.runtime import probe

    try:
        with open(probe.cache_path()) as f:
            table = json.load(f)
    except (OSError, ValueError):
        return
    disk = f"disk:{os.stat(offload_dir).st_dev}:"
    for key, rates in table.items():
        if key.startswith(("compute:", disk)):
            print(f"planner rates {key}: " + ", ".join(f"{r:.3g}" for r in rates))


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for r in results:
        if "timeline" in r:
            t, mib = zip(*r["timeline"], strict=True)
            (line,) = ax.plot(t, mib, label=r["config"])
            ax.axvline(r["forward_end_ms"], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_xlabel("ms into the step (dashed: forward ends)")
    ax.set_ylabel("MiB above in use after zero_grad, idle staging counted")
    ax.set_title("memory over one training step")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_pareto(results: list[dict], path: str) -> None:
    """Peak memory against median step time, one point per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    families = {"mb-": "fxoffload memory_budget", "budget-": "PyTorch activation_memory_budget"}
    for prefix, label in families.items():
        points = sorted(
            (r["step_ms"], r["peak_mib"], r["config"].removeprefix(prefix))
            for r in results
            if r["config"].startswith(prefix) and "step_ms" in r
        )
        if points:
            line = ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)[0]
            for x, y, text in points:
                ax.annotate(
                    text,
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    color=line.get_color(),
                    fontsize=8,
                )
    for r in results:
        if not r["config"].startswith(tuple(families)) and "step_ms" in r:
            ax.plot(r["step_ms"], r["peak_mib"], "s", label=r["config"])
    ax.set_xlabel("median step time, ms")
    ax.set_ylabel("peak MiB above in use after zero_grad")
    ax.set_title("memory against step time")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
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
        try:
            result = (run_child_max_batch if args.max_batch else run_child)(args, args.child)
        except Exception as e:
            traceback.print_exc()
            e = getattr(e, "inner_exception", None) or e  # dynamo's BackendCompilerFailed
            result = {"config": args.child, "error": f"{type(e).__name__}: {e}"}
        with open(os.environ["FXOFFLOAD_BENCH_RESULT"], "w") as f:
            json.dump(result, f)
        sys.exit(1 if "error" in result else 0)

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
        run_interleaved(args, names)
        return
    with tempfile.TemporaryDirectory() as tmp:
        rounds = []
        for round_ in range(args.rounds):
            results = []
            for name in names:
                print(f"  running {name} ...", file=sys.stderr, flush=True)
                path = os.path.join(tmp, f"{name}-{round_}.json")
                results.append(spawn(name, args.device, path))
                brief = {k: v for k, v in results[-1].items() if not isinstance(v, (list, dict))}
                print(f"  {name}: {brief}", file=sys.stderr, flush=True)
            rounds.append(results)
    if args.max_batch:
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
