"""Graph passes: pure functions over the partitioned forward and backward graphs.

No file, thread or stream is touched here; the passes only insert the
``ssdtrain::`` ops (``fxoffload.ops``) that the runtime later carries out.
See README.md in this folder for the invariants every pass keeps.
"""

from __future__ import annotations

import torch.fx as fx

from fxoffload.options import Options
from fxoffload.passes.plan import plan_offload
from fxoffload.passes.rewrite import insert_store_ops, insert_wait_ops
from fxoffload.passes.saved import (
    META_KEY,
    SavedKind,
    SavedValue,
    classify_saved_values,
    tag_saved_values,
)
from fxoffload.passes.schedule import schedule_prefetches

__all__ = ["META_KEY", "SavedKind", "SavedValue", "offload_saved_activations"]


def offload_saved_activations(
    fw_gm: fx.GraphModule,
    bw_gm: fx.GraphModule,
    *,
    num_fwd_outputs: int,
    static_input_indices: list[int] | None,
    options: Options,
) -> list[SavedValue]:
    """Rewrite ``fw_gm`` and ``bw_gm`` in place; return every saved value's decision."""
    # Step 1: find the saved values and classify each.
    saved = classify_saved_values(
        fw_gm, bw_gm, num_fwd_outputs=num_fwd_outputs, static_input_indices=static_input_indices
    )
    # Step 2: choose what to offload.
    planned = plan_offload(saved, policy=options.policy, min_bytes=options.min_bytes)
    tag_saved_values(fw_gm, bw_gm, planned)
    offloaded = [v for v in planned if v.offload]
    if not offloaded:
        return planned
    # Step 3: store in forward, wait in backward.
    insert_store_ops(
        fw_gm, offloaded, num_fwd_outputs=num_fwd_outputs, offload_dir=options.offload_dir
    )
    insert_wait_ops(bw_gm, offloaded)
    # Step 4: issue each read early enough to overlap backward compute.
    schedule_prefetches(bw_gm)
    return planned
