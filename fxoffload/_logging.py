"""Logs and structured-trace artifacts of each partition, through ``torch._logging``.

``TORCH_LOGS="fxoffload"`` prints one line per compiled graph (what is
offloaded and kept) and the table of decisions; ``TORCH_LOGS="+fxoffload"``
adds every rejected candidate's reason and the rewritten forward and backward
graphs. ``TORCH_TRACE=dir`` records the same as artifacts for tlparse. torch
accepts ``fxoffload`` in ``TORCH_LOGS`` because it is an importable module.
"""

from __future__ import annotations

import logging

from fxoffload._compat import trace_structured
from fxoffload.passes import SavedValue
from fxoffload.report import format_decisions, summarize

log = logging.getLogger("fxoffload")
graphs_log = logging.getLogger("fxoffload.graphs")


def log_partition(
    decisions: list[SavedValue],
    forward_code: str,
    backward_code: str,
    budget_note: str | None = None,
) -> None:
    log.info("%s", summarize(decisions))
    if budget_note is not None:
        log.info("%s", budget_note)
    log.info("saved values:\n%s", format_decisions(decisions))
    graphs_log.debug("rewritten forward:\n%s", forward_code)
    graphs_log.debug("rewritten backward:\n%s", backward_code)
    for name, payload in (
        ("fxoffload_plan", lambda: format_decisions(decisions)),
        ("fxoffload_forward_graph", lambda: forward_code),
        ("fxoffload_backward_graph", lambda: backward_code),
    ):
        trace_structured(
            "artifact",
            metadata_fn=lambda name=name: {"name": name, "encoding": "string"},
            payload_fn=payload,
        )
