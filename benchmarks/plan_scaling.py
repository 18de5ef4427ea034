"""How planning time grows with the number of saved values, and what it adds to a compile.

1. ``plan_adaptive`` on synthetic transfers shaped like a deep layer stack:
   value ``i`` of ``n`` is made at ``i`` ms into forward and first used at
   ``n - i`` ms into backward, 1 MiB each, on a disk that hides about half
   of them. Printed: milliseconds to plan, per candidate count.
2. A stack of ``--layers`` Linear + GELU layers (two saved values each)
   compiled with aot_eager under ``policy="none"`` and ``"adaptive"`` (given
   rates, so nothing is measured), each in a fresh Dynamo state: the first
   call's time (trace, partition, passes) and the ratio of the two.

Run from the repository root::

    python benchmarks/plan_scaling.py [--counts 250,500,1000,2000,5000] [--layers 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from fxoffload.options import Options
from fxoffload.passes.costs import DeviceCosts
from fxoffload.passes.plan import Transfer, plan_adaptive

RATES = {
    "flops_per_s": 1e9,
    "memory_bytes_per_s": 1e9,
    "write_bytes_per_s": 5e8,
    "read_bytes_per_s": 5e8,
}


def plan_seconds(count: int) -> tuple[float, int]:
    mib = 1 << 20
    transfers = [
        Transfer(f"v{i}", mib, produced=i * 1e-3, first_use=(count - i) * 1e-3)
        for i in range(count)
    ]
    costs = DeviceCosts(
        flops_per_s=1e9, memory_bytes_per_s=1e9, write_bytes_per_s=5e8, read_bytes_per_s=5e8
    )
    options = Options(prefetch_budget_bytes=1 << 40, max_inflight_bytes=1 << 40)
    begin = time.perf_counter()
    decisions = plan_adaptive(
        transfers, fw_end=count * 1e-3, step=3 * count * 1e-3, costs=costs, options=options
    )
    return time.perf_counter() - begin, sum(offload for offload, _ in decisions.values())


def compile_seconds(layers: int, policy: str, directory: str) -> float:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()) for _ in range(layers)]
    )
    options = {
        "policy": policy,
        "compiler": "aot_eager",
        "min_bytes": 0,
        "offload_dir": directory,
        **RATES,
    }
    compiled = torch.compile(model, backend="ssdtrain", options=options)
    x = torch.randn(32, 64)
    begin = time.perf_counter()
    compiled(x).sum().backward()
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="250,500,1000,2000,5000")
    parser.add_argument("--layers", type=int, default=64)
    args = parser.parse_args()

    print("candidates  plan ms  offloaded")
    for count in map(int, args.counts.split(",")):
        seconds, offloaded = plan_seconds(count)
        print(f"{count:>10}  {seconds * 1e3:>7.1f}  {offloaded:>9}")

    with tempfile.TemporaryDirectory() as directory:
        compile_seconds(2, "none", directory)  # warm up imports and Dynamo
        none = compile_seconds(args.layers, "none", directory)
        adaptive = compile_seconds(args.layers, "adaptive", directory)
    print(f"\ncompile of {args.layers} layers (aot_eager, first call):")
    print(f"  none {none:.2f} s, adaptive {adaptive:.2f} s, ratio {adaptive / none:.2f}")


if __name__ == "__main__":
    main()
