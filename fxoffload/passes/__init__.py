"""Graph passes: pure functions over the partitioned forward and backward graphs.

No file, thread or stream is touched here; the passes only insert the
``ssdtrain::`` ops (``fxoffload.ops``) that the runtime later carries out.
See README.md in this folder for the invariants every pass keeps.
"""

from __future__ import annotations

import torch.fx as fx

from fxoffload import ops
from fxoffload.options import Options
from fxoffload.passes.costs import DeviceCosts
from fxoffload.passes.plan import plan_stores, select_candidates
from fxoffload.passes.rewrite import insert_store_ops, insert_wait_ops
from fxoffload.passes.saved import (
    META_KEY,
    SavedKind,
    SavedValue,
    classify_saved_values,
    tag_saved_values,
)
from fxoffload.passes.schedule import schedule_prefetches
from fxoffload.passes.views import erase_unused_views, group_views

__all__ = ["META_KEY", "SavedKind", "SavedValue", "offload_saved_activations"]


def offload_saved_activations(
    fw_gm: fx.GraphModule,
    bw_gm: fx.GraphModule,
    *,
    num_fwd_outputs: int,
    static_input_indices: list[int] | None,
    options: Options,
    costs: DeviceCosts | None,
    store_limit: int | None = None,
) -> list[SavedValue]:
    """Rewrite ``fw_gm`` and ``bw_gm`` in place; return every saved value's decision.

    ``store_limit``: offload at most the first that many stores forward makes
    (``memory_budget.py``, when its budget needs no more).
    """
    # Step 1: find the saved values and classify each.
    saved = classify_saved_values(
        fw_gm, bw_gm, num_fwd_outputs=num_fwd_outputs, static_input_indices=static_input_indices
    )
    # Step 2: the candidates, by policy and min_bytes.
    planned = select_candidates(saved, options)
    # Step 3: the stores they make: a base once for its saved views.
    planned, stores = group_views(fw_gm, planned)
    # Step 4: under "adaptive", keep the stores whose I/O the disk cannot hide.
    planned, stores = plan_stores(
        planned,
        stores,
        fw_gm.graph,
        bw_gm.graph,
        options=options,
        costs=costs,
        store_limit=store_limit,
    )
    tag_saved_values(fw_gm, bw_gm, planned)
    if not stores:
        return planned
    # Step 5: store in forward, wait in backward.
    records = {v.name: v for v in planned}
    engine = ops.engine_key(options.offload_dir, options.io_settings)
    insert_store_ops(fw_gm, stores, records, num_fwd_outputs=num_fwd_outputs, engine=engine)
    insert_wait_ops(bw_gm, stores, records)
    erase_unused_views(fw_gm, stores)
    # Step 6: issue each read as late as the timeline the plan used allows.
    schedule_prefetches(bw_gm, costs, options=options)
    return planned
