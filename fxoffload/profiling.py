"""Measured node times for the cost model (``cost_model="profile"``).

The FLOP model knows FLOPs and bytes, not what a node costs on this device:
memory-bound ops, small kernels, thread counts. A profile runs a graph once,
op by op, on random inputs of the traced shapes (integers zero, so any index
is valid), and records each node's time in ``node.meta[MEASURED_SECONDS]``,
which ``passes.costs.node_time`` prefers to the model. The ops run eagerly and
unfused, so like the model the times are an upper bound for compiled code;
they are measured instead of assumed. Each value is freed after its last use,
so the profile holds no more memory than eager execution of the graph.

The partitioner profiles the joint forward and backward graph once, and
``copy_times`` hands each time to the node of the same name in each
partition (PyTorch's partitioner copies nodes with their names; a node it
recomputes in backward is a copy too), so trying many partitions, as
``memory_budget`` does, costs one profile.

A graph that cannot run on such inputs (an op that checks its values, say)
keeps the FLOP model, with a warning naming the op. Profiled times change
from run to run, so they are not part of the compile cache key: a cached
compile keeps the plan of the run that profiled it.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
import torch.fx as fx

from fxoffload._compat import real_tensors, size_hint
from fxoffload.passes.costs import MEASURED_SECONDS


def profile(gm: fx.GraphModule, repeats: int = 2) -> None:
    """Record the time of every call in ``gm`` (its last of ``repeats`` runs) in its meta."""
    last_use = {}
    for node in gm.graph.nodes:
        for used in node.all_input_nodes:
            last_use[used] = node
    times: dict[fx.Node, float] = {}
    with real_tensors(), torch.no_grad():
        for _ in range(repeats):
            env: dict[fx.Node, Any] = {}
            for node in gm.graph.nodes:
                try:
                    env[node] = _run(gm, node, env, times)
                except Exception as e:  # the graph keeps the FLOP model
                    warnings.warn(
                        f"fxoffload could not profile {node.format_node()} on random inputs "
                        f"({type(e).__name__}: {e}); this graph is planned with the FLOP model",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    return
                for used in node.all_input_nodes:
                    if last_use[used] is node:
                        del env[used]
    for node, seconds in times.items():
        node.meta[MEASURED_SECONDS] = seconds


def copy_times(profiled: fx.GraphModule, partition: fx.GraphModule) -> None:
    """Give each node of ``partition`` the measured time of its namesake in ``profiled``
    (if it calls the same op: a node the partitioner made keeps the FLOP model)."""
    measured = {n.name: n for n in profiled.graph.nodes if MEASURED_SECONDS in n.meta}
    for node in partition.graph.nodes:
        source = measured.get(node.name)
        if node.op == "call_function" and source is not None and source.target == node.target:
            node.meta[MEASURED_SECONDS] = source.meta[MEASURED_SECONDS]


def _run(gm: fx.GraphModule, node: fx.Node, env: dict, times: dict) -> Any:
    if node.op == "placeholder":
        return _random_like(node.meta.get("val"))
    if node.op == "get_attr":
        return getattr(gm, node.target)
    if node.op != "call_function":
        return None
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
    device = _device_of(node.meta.get("val"))
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else None
    if sync:
        sync(device)
    start = time.perf_counter()
    out = node.target(*args, **kwargs)
    if sync:
        sync(device)
    times[node] = time.perf_counter() - start
    return out


def _random_like(val: object) -> object:
    """A real value standing for the traced ``val``: random floats, zero integers."""
    if isinstance(val, torch.SymInt):
        return size_hint(val)
    if not isinstance(val, torch.Tensor):
        return val
    sizes = [size_hint(s) for s in val.shape]
    strides = [size_hint(s) for s in val.stride()]
    # Filled as a flat storage, then viewed: strides may overlap (expanded values).
    span = 1 + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True)) if all(sizes) else 0
    flat = torch.empty(span, dtype=val.dtype, device=val.device)
    flat = flat.normal_() if flat.is_floating_point() or flat.is_complex() else flat.zero_()
    return flat.as_strided(sizes, strides)


def _device_of(val: object) -> torch.device | None:
    for v in val if isinstance(val, (tuple, list)) else (val,):
        if isinstance(v, torch.Tensor):
            return v.device
    return None
