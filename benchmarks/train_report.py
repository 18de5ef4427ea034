"""``train_step.py``'s output: the tables, the planner's rates, and the plots.

``combine`` folds several rounds into one row per configuration, with each
ratio taken to the first configuration of its own round.
"""

from __future__ import annotations

import argparse
import statistics

from train_configs import SSDTRAIN

from fxoffload.runtime import probe


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


def print_interleaved(
    times: dict[str, list[float]], cpu: dict[str, list[float]], reference: str
) -> None:
    """``run_interleaved``'s steps: each ratio pairs a step with the reference's step just
    before it, and the median of those paired ratios is printed."""
    steps = len(times[reference])
    print(f"{steps} alternated steps in one process; ratios paired with {reference}'s step")
    print("{:<12} {:>8} {:>17} {:>7}".format("config", "step ms", "ratio", "cpu ms"))
    for name in times:
        paired = [t / ref for t, ref in zip(times[name], times[reference], strict=True)]
        print(
            f"{name:<12} {statistics.median(times[name]) * 1e3:>8.0f} "
            f"{ratio_text(paired):>17} {statistics.median(cpu[name]) * 1e3:>7.0f}"
        )


def print_rates(offload_dir: str) -> None:
    """The device rates the adaptive planner used, as measured and cached by fxoffload
    (the disk's: those of the file system of ``offload_dir``)."""
    for key, rates in probe.cached_rates(offload_dir).items():
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
