"""Choose which candidate activations to offload under the configured policy."""

from __future__ import annotations

import dataclasses
import logging

from fxoffload.passes.saved import SavedValue

log = logging.getLogger(__name__)


def plan_offload(saved: list[SavedValue], *, policy: str, min_bytes: int) -> list[SavedValue]:
    """Return the records with their final ``offload`` decision and reason.

    ``"all"`` offloads every candidate of at least ``min_bytes``; ``"none"``
    offloads nothing (the baseline). Non-candidates keep their classification.
    """
    planned = []
    for value in saved:
        if value.offload and policy == "none":
            value = dataclasses.replace(value, offload=False, reason='policy "none"')
        elif value.offload and value.nbytes < min_bytes:
            value = dataclasses.replace(
                value, offload=False, reason=f"{value.nbytes} bytes < min_bytes={min_bytes}"
            )
        if not value.offload:
            log.debug("keep %s: %s", value.name, value.reason)
        planned.append(value)
    return planned
