"""Text renderings of the passes' decisions, shared by ``explain()`` and the logs."""

from __future__ import annotations

from fxoffload.passes import SavedKind, SavedValue


def summarize(decisions: list[SavedValue]) -> str:
    """One line: how many saved tensors and bytes are offloaded, how many kept and why."""
    offloaded = [d for d in decisions if d.offload]
    kept = [d for d in decisions if not d.offload]
    reasons: dict[str, int] = {}
    for d in kept:
        reasons[d.kind.value] = reasons.get(d.kind.value, 0) + 1
    why = ", ".join(f"{n} {kind}" for kind, n in reasons.items())
    return (
        f"offloading {len(offloaded)} of {len(decisions)} saved values "
        f"({sum(d.bytes_written for d in decisions)} bytes written); "
        f"kept {len(kept)}" + (f" ({why})" if why else "")
    )


def format_decisions(decisions: list[SavedValue]) -> str:
    """A fixed-width table: name, shape, dtype, bytes, decision, reason."""
    header = ("name", "shape", "dtype", "bytes", "decision", "reason")
    rows = [
        (
            d.name,
            "-" if d.shape is None else str(list(d.shape)),
            "-" if d.dtype is None else str(d.dtype).removeprefix("torch."),
            str(d.nbytes),
            "recompute" if d.kind is SavedKind.RECOMPUTED else "offload" if d.offload else "keep",
            d.reason,
        )
        for d in decisions
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)
