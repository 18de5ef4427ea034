"""The partition function: PyTorch's min-cut partitioner, then our passes.

One object serves both compilers: ``aot_autograd(partition_fn=...)`` calls it
directly for ``aot_eager``, and inductor calls it as
``config.custom_partitioner_fn`` after its joint-graph passes (which must run
first: dropout's RNG rewrite lives there).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx

from fxoffload import profiling
from fxoffload._compat import (
    CustomPartitionerFn,
    functorch_config,
    get_hash_for_files,
    min_cut_rematerialization_partition,
)
from fxoffload._logging import log_partition
from fxoffload.memory_budget import plan_under_budget
from fxoffload.options import Options
from fxoffload.passes import SavedValue, offload_saved_activations
from fxoffload.passes.costs import DeviceCosts

_SOURCES = tuple(sorted(str(p) for p in pathlib.Path(__file__).parent.rglob("*.py")))


@dataclasses.dataclass(frozen=True)
class PartitionResult:
    """What one partition produced: the decisions and the rewritten graphs' code.

    The code is captured right after our passes, before the inner compiler
    changes the graphs (for instance to boxed calling convention).
    """

    decisions: list[SavedValue]
    forward_code: str
    backward_code: str
    budget_note: str | None = None
    """Under ``memory_budget``: what it asked for and what the plan reached."""
    fw_gm: fx.GraphModule | None = dataclasses.field(default=None, repr=False, compare=False)
    """The rewritten forward graph itself, which the simulator times; the inner
    compiler may change it later (``aot_eager`` does not)."""
    bw_gm: fx.GraphModule | None = dataclasses.field(default=None, repr=False, compare=False)
    """The rewritten backward graph, likewise."""


class OffloadPartitioner(CustomPartitionerFn):
    """Min-cut partition, then offload the saved activations the options select.

    Args:
        options: the backend's options.
        costs: the device rates the cost model plans with (None for ``policy="none"``).
        on_partition: called with each :class:`PartitionResult` (``explain`` uses
            it); not part of the cache key.
    """

    def __init__(
        self,
        options: Options,
        costs: DeviceCosts | None = None,
        on_partition: Callable[[PartitionResult], None] | None = None,
    ) -> None:
        self.options = options
        self.costs = costs
        self.on_partition = on_partition

    def __call__(
        self, gm: fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        profiled = self.costs is not None and self.options.cost_model == "profile"
        if profiled:
            profiling.profile(gm)  # once: every partition's nodes are copies of the joint's

        def partition(pytorch_budget: float) -> tuple[fx.GraphModule, fx.GraphModule]:
            with functorch_config.patch(activation_memory_budget=pytorch_budget):
                fw_gm, bw_gm = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
            if profiled:
                for graph in (fw_gm, bw_gm):
                    profiling.copy_times(gm, graph)
            return fw_gm, bw_gm

        passes = {
            "num_fwd_outputs": kwargs["num_fwd_outputs"],
            "static_input_indices": kwargs.get("static_lifetime_input_indices"),
            "options": self.options,
        }
        note = None
        if self.options.memory_budget < 1:
            assert self.costs is not None  # the backend measures them for every budget
            plan, note = plan_under_budget(partition, costs=self.costs, **passes)
            fw_gm, bw_gm, decisions = plan.fw_gm, plan.bw_gm, plan.decisions
        else:
            fw_gm, bw_gm = partition(functorch_config.activation_memory_budget)
            decisions = offload_saved_activations(fw_gm, bw_gm, costs=self.costs, **passes)
        result = PartitionResult(
            decisions, fw_gm.code.strip(), bw_gm.code.strip(), note, fw_gm, bw_gm
        )
        log_partition(result.decisions, result.forward_code, result.backward_code, note)
        if self.on_partition is not None:
            self.on_partition(result)
        return fw_gm, bw_gm

    def uuid(self) -> bytes:
        """Our sources, options and costs: a cached graph is reused only if all match."""
        return get_hash_for_files(_SOURCES) + repr((self.options, self.costs)).encode()
