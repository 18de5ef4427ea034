"""``python -m fxoffload``: inspect a model's offload plan, simulate it on other hardware,
or run the benchmarks."""

from __future__ import annotations

import argparse
import ast
import importlib
import pathlib
import runpy
import sys
from collections.abc import Sequence

from fxoffload.hardware import PRESETS, Hardware, preset
from fxoffload.simulation import BUDGETS

BENCHMARKS = {
    "io": "io_bandwidth.py",
    "train": "train_step.py",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fxoffload",
        description="Activation offloading to NVMe files as a torch.compile backend.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    explain = commands.add_parser(
        "explain",
        help="print what ssdtrain offloads for a model, and the rewritten graphs",
        description=(
            "Import MODULE, call FACTORY() to get (model, example_inputs), compile the "
            "model with backend='ssdtrain', run one forward and print the saved values "
            "(name, shape, dtype, bytes, decision, reason) and the rewritten forward "
            "and backward graphs."
        ),
    )
    explain.add_argument(
        "target",
        metavar="MODULE:FACTORY",
        help="e.g. examples.train_tiny_gpt:make_gpt (from the repository root); FACTORY "
        "returns (model, inputs), inputs a tensor, a tuple of them, or a dict of keyword "
        "inputs",
    )
    explain.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a backend option, e.g. -o min_bytes=0 -o compiler=aot_eager (repeatable)",
    )

    simulate = commands.add_parser(
        "simulate",
        help="predict the plan, memory, step time and drive wear on given hardware",
        description=(
            "Import MODULE, call FACTORY() to get (model, example_inputs), trace the model "
            "with fake inputs (build it on the meta device to allocate nothing) and run "
            "ssdtrain's planner with the given rates instead of measured ones. Prints, for "
            "policies none, adaptive, all, full recomputation and each memory budget, the "
            "saved-activation bytes in memory at the start of backward, the predicted step "
            "time and stalls, the bytes written per step and, with --tbw, the drive wear; "
            "then the adaptive plan. Rates not given come from --hardware."
        ),
    )
    simulate.add_argument("target", metavar="MODULE:FACTORY", help="as for explain")
    simulate.add_argument(
        "--hardware", choices=sorted(PRESETS), help="datasheet rates to start from"
    )
    simulate.add_argument("--flops", type=float, metavar="TFLOPS", help="dense 16-bit TFLOP/s")
    simulate.add_argument(
        "--flops-fp32",
        type=float,
        metavar="TFLOPS",
        help="float32 matmul TFLOP/s (default: --flops for every dtype, or the preset's)",
    )
    simulate.add_argument("--memory-bw", type=float, metavar="GBPS", help="memory GB/s")
    simulate.add_argument(
        "--disk",
        type=_rates,
        required=True,
        metavar="GBPS[,GBPS...]",
        help="write GB/s of each drive; planned with their sum",
    )
    simulate.add_argument(
        "--disk-read", type=_rates, metavar="GBPS[,GBPS...]", help="read GB/s (default: --disk)"
    )
    simulate.add_argument(
        "--pcie", type=float, metavar="GBPS", help="accelerator link GB/s, one direction"
    )
    simulate.add_argument(
        "--tbw", type=float, metavar="N", help="drive endurance in terabytes written"
    )
    simulate.add_argument(
        "--budgets",
        type=_rates,
        default=BUDGETS,
        metavar="B[,B...]",
        help=f"memory budgets to simulate (default: {','.join(map(str, BUDGETS))})",
    )
    simulate.add_argument(
        "-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="as for explain"
    )

    bench = commands.add_parser(
        "bench",
        help="run a benchmark from a source checkout",
        description="Run benchmarks/<name> with its defaults; arguments after the name "
        "go to the benchmark (try: python -m fxoffload bench io --help).",
    )
    bench.add_argument("name", choices=sorted(BENCHMARKS), nargs="?", default="io")
    bench.add_argument("args", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args.name, args.args)
    try:
        return _explain(args) if args.command == "explain" else _simulate(args)
    except UsageError as e:  # as argparse reports a bad argument: one line, status 2
        prog = explain.prog if args.command == "explain" else simulate.prog
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


class UsageError(Exception):
    """A mistake in the command line: an option, a value, a factory that is not there."""


def _load(target: str) -> tuple[object, tuple[object, ...], dict[str, object]]:
    """``FACTORY()``'s model, and its inputs as positional and keyword arguments."""
    module_name, sep, factory_name = target.partition(":")
    if not sep or not module_name or not factory_name:
        raise UsageError(f"expected MODULE:FACTORY, got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"cannot import {module_name!r}: {e}") from e
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"module {module_name!r} has no factory {factory_name!r}")
    model, inputs = factory()
    if isinstance(inputs, dict):
        return model, (), inputs
    return model, inputs if isinstance(inputs, tuple) else (inputs,), {}


def _explain(args: argparse.Namespace) -> int:
    import fxoffload

    try:
        options = fxoffload.Options.from_dict(_parse_options(args.option))
    except ValueError as e:
        raise UsageError(e) from e
    model, inputs, keywords = _load(args.target)
    print(fxoffload.explain(model, *inputs, options=options, **keywords))
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import fxoffload

    given = {
        "flops_per_s": args.flops and args.flops * 1e12,
        "flops_per_s_32bit": args.flops_fp32 and args.flops_fp32 * 1e12,
        "memory_bytes_per_s": args.memory_bw and args.memory_bw * 1e9,
        "disk_write_bytes_per_s": tuple(r * 1e9 for r in args.disk),
        "disk_read_bytes_per_s": args.disk_read and tuple(r * 1e9 for r in args.disk_read),
        "pcie_bytes_per_s": args.pcie and args.pcie * 1e9,
    }
    given = {key: value for key, value in given.items() if value is not None}
    if args.hardware is not None:
        hardware = preset(args.hardware, **given)
    elif args.flops is None or args.memory_bw is None:
        raise UsageError("give --hardware, or both --flops and --memory-bw")
    else:
        hardware = Hardware("custom", **given)
    options = _parse_options(args.option)
    model, inputs, keywords = _load(args.target)
    print(
        fxoffload.simulate(
            model,
            *inputs,
            hardware=hardware,
            options=options,
            budgets=args.budgets,
            tbw=args.tbw,
            **keywords,
        )
    )
    return 0


def _rates(text: str) -> tuple[float, ...]:
    """``7,7,6.5`` as numbers, for argparse."""
    try:
        return tuple(float(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None


def _parse_options(items: list[str]) -> dict[str, object]:
    options: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"expected KEY=VALUE, got {item!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # a plain string such as aot_eager
    return options


def _bench(name: str, args: list[str]) -> int:
    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / BENCHMARKS[name]
    if not script.exists():
        raise SystemExit(
            f"benchmark {script} not found: the benchmarks live in the source checkout "
            "(install it with pip install -e .)"
        )
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))  # as `python script` does: it imports its siblings
    runpy.run_path(str(script), run_name="__main__")
    return 0
