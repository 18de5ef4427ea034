"""The configurations ``train_step.py`` compares, and the training step each runs.

    none, adaptive, all  the ssdtrain backend with that policy
    mb-B                 the ssdtrain backend, policy "adaptive", memory_budget = B
    recompute            checkpoint around each block, stock inductor
    budget-B             stock inductor under activation_memory_budget = B
    save_on_cpu          eager under torch.autograd.graph.save_on_cpu

A ``Trainer`` holds one configuration's model, optimizer and compiled forward;
its ``step`` is zero_grad, forward, backward and SGD, timed and measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import time

import torch
from bench_models import MODELS
from memory_meter import Meter, exact_rss, trim_heap

import fxoffload

FRACTIONS = (0.1, 0.3, 0.5, 0.7)
BUDGETS = {"budget-0": 0.0, **{f"budget-{b}": b for b in FRACTIONS}}
MEMORY_BUDGETS = {f"mb-{b}": b for b in FRACTIONS}
CONFIGS = ("none", "adaptive", "all", "recompute", *BUDGETS, *MEMORY_BUDGETS, "save_on_cpu")
SSDTRAIN = ("none", "adaptive", "all", *MEMORY_BUDGETS)
INTERLEAVABLE = (*SSDTRAIN, "recompute", "save_on_cpu")
"""Those that can share a process: ``--interleave`` compiles them side by side."""


def parse_value(text: str):
    """An ``--option`` value: true/false, an int, a float, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def ssdtrain_options(args: argparse.Namespace, name: str) -> dict:
    """The backend's options for configuration ``name``, ``--option``s last."""
    options = {"policy": name, "offload_dir": args.offload_dir}
    if name in MEMORY_BUDGETS:
        options.update(policy="adaptive", memory_budget=MEMORY_BUDGETS[name])
    options.update((k, parse_value(v)) for k, v in (o.split("=", 1) for o in args.option))
    fxoffload.Options.from_dict(options)  # a bad option fails here, not inside dynamo
    return options


class Trainer:
    """One configuration's model, optimizer and compiled forward, and its training step.

    A ``budget-B`` configuration's ``activation_memory_budget`` is patched
    around each forward (where the graph compiles and is partitioned), so it
    never outlives the step.
    """

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
        self.device = device = torch.device(args.device)
        torch.manual_seed(0)
        self.model = MODELS[args.model](args, recompute=name == "recompute").to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-2)
        self.contexts = [
            lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast)
        ]
        if name in SSDTRAIN:
            options = ssdtrain_options(args, name)
            self.forward = torch.compile(self.model, backend="ssdtrain", options=options)
        elif name == "save_on_cpu":
            self.forward = self.model
            pin = device.type == "cuda"
            self.contexts.append(lambda: torch.autograd.graph.save_on_cpu(pin_memory=pin))
        else:
            if name in BUDGETS:
                budget = BUDGETS[name]
                self.contexts.append(
                    lambda: torch._functorch.config.patch(activation_memory_budget=budget)
                )
            self.forward = torch.compile(self.model)
        self.meter = Meter(device)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        self.exact_rss = exact_rss()  # the child runs with MMAP_ENV (see train_runs.spawn)

    def batch(self, args: argparse.Namespace, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` sequences of random tokens: inputs and targets."""
        data = torch.randint(0, args.vocab, (size, args.seq_len + 1), device=self.device)
        return data[:, :-1], data[:, 1:]

    def step(self, idx, targets, marks: dict | None = None) -> tuple[float, float, int, int]:
        """One training step: its seconds, forward seconds, peak bytes, bytes held after forward."""
        gc.collect()
        if self.exact_rss:
            trim_heap()
        self.sync()
        cpu_start, io_start = time.process_time(), fxoffload.stats().io_cpu_ns
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
        self.io_cpu_seconds = (fxoffload.stats().io_cpu_ns - io_start) / 1e9
        if marks is not None:
            marks.update(start=start, forward_end=forward_end, before=before)
        return seconds, forward_end - start, self.meter.peak() - before, after_forward
