"""The ``ssdtrain`` torch.compile backend: aot_autograd wiring only.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="ssdtrain", options={...})`` works after
``pip install`` without importing fxoffload.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

from fxoffload._compat import aot_autograd, boxed_nop
from fxoffload.options import Options
from fxoffload.partitioner import OffloadPartitioner, PartitionResult
from fxoffload.passes.costs import DeviceCosts
from fxoffload.runtime import Engine, EngineConfig, probe, registry


def ssdtrain(
    gm: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    options: Mapping[str, Any] | Options | None = None,
) -> Callable[..., Any]:
    """Compile ``gm`` with its saved activations offloaded to files.

    Options are checked here, and the offload directory is created now, so a
    bad option or an unusable directory fails at compile time.
    """
    return compile_with_offloading(gm, example_inputs, Options.from_dict(options))


def inductor_config_patches(partitioner: OffloadPartitioner) -> dict[str, Any]:
    """Inductor settings for every policy, ``"none"`` included, so that it stays the baseline.

    Layout optimization is off: it turns convolution outputs channels-last
    after partitioning, so backward would read a saved conv output in a layout
    the partitioner could not know, and an offloaded one (restored in its
    traced layout) would take other, last-bit-different kernels. It only ever
    applies to graphs with convolutions.
    """
    return {"custom_partitioner_fn": partitioner, "layout_optimization": False}


def compile_with_offloading(
    gm: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    options: Options,
    on_partition: Callable[[PartitionResult], None] | None = None,
    costs: DeviceCosts | None = None,
) -> Callable[..., Any]:
    """Compile with our partitioner; given ``costs``, plan with them and touch no engine.

    Without ``costs`` an offloading policy measures the rates it was not given, on the
    engine of ``offload_dir``. The simulator passes them, from a hardware record,
    with ``aot_eager``, and never runs what is compiled.
    """
    if costs is None and options.policy != "none":
        engine = registry.engine_for(options.offload_dir, EngineConfig(**options.io_settings))
        costs = device_costs(options, engine, _device_of(example_inputs))
    partitioner = OffloadPartitioner(options, costs, on_partition)
    if options.compiler == "inductor":
        from fxoffload import lowering  # noqa: F401  (registers the lowerings of store and wait)
        from fxoffload._compat import compile_fx

        return compile_fx(gm, example_inputs, config_patches=inductor_config_patches(partitioner))
    return aot_autograd(
        fw_compiler=boxed_nop,
        bw_compiler=boxed_nop,
        partition_fn=partitioner,
        keep_inference_input_mutations=True,
    )(gm, example_inputs)


def device_costs(options: Options, engine: Engine, device: torch.device) -> DeviceCosts:
    """The cost model's rates: those the options give, the others measured (and cached).

    The compute the I/O takes counts only on a CPU device, whose cores compute, and only
    where the disk was measured.
    """
    write, read = options.write_bytes_per_s, options.read_bytes_per_s
    io_compute = 0.0
    if write is None or read is None:
        measured = probe.disk_rates(engine.drives, engine.config)
        write, read = write or measured[0], read or measured[1]
        io_compute = measured[2] if device.type == "cpu" else 0.0
    flops, memory = options.flops_per_s, options.memory_bytes_per_s
    flops_16bit = None  # a given flops_per_s is the rate of every dtype
    copy = None  # given rates: half the memory bandwidth
    if flops is None or memory is None:
        measured = probe.compute_rates(device)
        if flops is None:
            flops, flops_16bit = measured[0], measured[1]
        memory = memory or measured[2]
        copy = measured[3]
    return DeviceCosts(
        flops_per_s=flops,
        memory_bytes_per_s=memory,
        write_bytes_per_s=write,
        read_bytes_per_s=read,
        flops_per_s_16bit=flops_16bit,
        copy_bytes_per_s=copy,
        io_compute_seconds_per_byte=io_compute,
    )


def _device_of(example_inputs: list[torch.Tensor]) -> torch.device:
    """The device the graph computes on: that of its first tensor input, else the CPU."""
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")
