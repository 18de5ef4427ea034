"""``python -m fxoffload``: inspect a model's offload plan, or run the benchmarks."""

from __future__ import annotations

import argparse
import ast
import importlib
import pathlib
import runpy
import sys
from collections.abc import Sequence

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

    bench = commands.add_parser(
        "bench",
        help="run a benchmark from a source checkout",
        description="Run benchmarks/<name> with its defaults; arguments after the name "
        "go to the benchmark (try: python -m fxoffload bench io --help).",
    )
    bench.add_argument("name", choices=sorted(BENCHMARKS), nargs="?", default="io")
    bench.add_argument("args", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    if args.command == "explain":
        try:
            return _explain(args.target, args.option)
        except UsageError as e:  # as argparse reports a bad argument: one line, status 2
            print(f"{explain.prog}: error: {e}", file=sys.stderr)
            return 2
    return _bench(args.name, args.args)


class UsageError(Exception):
    """A mistake in the command line: an option, a value, a factory that is not there."""


def _explain(target: str, option_args: list[str]) -> int:
    import fxoffload

    module_name, sep, factory_name = target.partition(":")
    if not sep or not module_name or not factory_name:
        raise UsageError(f"expected MODULE:FACTORY, got {target!r}")
    try:
        options = fxoffload.Options.from_dict(_parse_options(option_args))
    except ValueError as e:
        raise UsageError(e) from e
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"cannot import {module_name!r}: {e}") from e
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"module {module_name!r} has no factory {factory_name!r}")
    model, inputs = factory()
    if isinstance(inputs, dict):
        print(fxoffload.explain(model, options=options, **inputs))
    else:
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        print(fxoffload.explain(model, *inputs, options=options))
    return 0


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
    runpy.run_path(str(script), run_name="__main__")
    return 0
