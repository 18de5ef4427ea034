"""Defaults of every ``ssdtrain`` option, as a patchable PyTorch-style config.

The one place that documents each knob. ``torch.compile(..., options={...})``
overrides these per compile; this module changes the defaults for every
compile, the way ``torch._functorch.config`` does::

    import fxoffload

    with fxoffload.config.patch(policy="none"):        # context manager
        compiled = torch.compile(model, backend="ssdtrain")

    @fxoffload.config.patch(min_bytes=4 << 20)          # or decorator
    def train(): ...

Each option is defined here once: its type and constraints in the annotation
(``fxoffload.option_checks``), its default, its meaning in the comment above
it. ``Options``, its validation and the runtime's ``EngineConfig`` are built
from these; ``ENGINE`` marks the I/O options, which with ``offload_dir`` name
an engine.

Environment: ``FXOFFLOAD_DIR`` sets ``offload_dir``'s default (several
directories joined by ``os.pathsep``), read when fxoffload is imported.
"""

import sys
from typing import Annotated, Literal

from fxoffload import option_checks as c
from fxoffload._compat import Config, install_config_module

# Where offload files go: the engine makes a private 0700 directory inside.
# Several directories, one per drive: a list, or one string of paths joined by
# os.pathsep (as in $PATH); each tensor is split over them by their write rates.
# None: $FXOFFLOAD_DIR if set, else the system temporary directory. (Typed as a
# string only because torch's config module reads only strings from the
# environment; fxoffload.options.offload_dirs reads the value.)
offload_dir: str | None = Config(default=None, env_name_default="FXOFFLOAD_DIR")

# "adaptive": offload the saved activations whose writes and reads the cost
# model says are hidden behind compute. "all": every eligible one. "none":
# rewrite nothing, same partitioner and compiler (the bitwise baseline).
policy: Literal["adaptive", "all", "none"] = "adaptive"

# At most this fraction of the saved-activation bytes (of PyTorch's partition
# with nothing offloaded and no budget) stays in memory at the start of
# backward: offloading hides what the disk can, PyTorch's recomputation buys
# the rest (fxoffload/memory_budget.py). 1.0: no budget, nothing recomputed
# beyond PyTorch's default partition.
memory_budget: Annotated[float, c.AtLeast(0.0), c.AtMost(1)] = 1.0

# Saved tensors smaller than this stay in memory.
min_bytes: Annotated[int, c.AtLeast(0)] = 1 << 20

# The cost model plans I/O as taking this many times its measured time.
io_safety: Annotated[float, c.AtLeast(1.0)] = 1.5

# At most this many bytes are read ahead of their use in backward.
prefetch_budget_bytes: Annotated[int, c.AtLeast(0)] = 1 << 30

# "adaptive" offloads only while the step time offloading pays by the model
# (each store's copy into staging, and the compute its I/O takes where the
# device's cores compute) stays within this fraction of the modelled step.
max_overhead: Annotated[float, c.AtLeast(0.0)] = 0.1

# Device rates for the cost model; None: measured once per file system (the
# disk) and per device and thread count (compute), cached per user
# (fxoffload.runtime.probe.cache_path()).
write_bytes_per_s: Annotated[float | None, c.Above(0.0)] = None
read_bytes_per_s: Annotated[float | None, c.Above(0.0)] = None
flops_per_s: Annotated[float | None, c.Above(0.0)] = None
memory_bytes_per_s: Annotated[float | None, c.Above(0.0)] = None

# How the cost model times the graph's nodes: "flops" (FLOPs and bytes moved
# at the device's rates) or "profile" (each graph run once, op by op, on random
# inputs when it is compiled; see fxoffload/profiling.py).
cost_model: Literal["flops", "profile"] = "flops"

# Compiler for the rewritten graphs: "inductor", or "aot_eager" for tests.
compiler: Literal["inductor", "aot_eager"] = "inductor"

# I/O worker threads per engine (an offload directory and its I/O options).
io_threads: Annotated[int, c.AtLeast(1), c.ENGINE] = 4

# Tensors move in chunks of this many bytes (a multiple of 4096).
chunk_bytes: Annotated[int, c.AtLeast(4096), c.MultipleOf(4096), c.ENGINE] = 8 << 20

# At most this many bytes wait to be written; a store beyond it waits.
max_inflight_bytes: Annotated[int, c.AtLeast(1), c.ENGINE] = 1 << 30

# "direct" (O_DIRECT), "buffered", or "auto" (direct where supported).
io_mode: Annotated[Literal["auto", "direct", "buffered"], c.ENGINE] = "auto"

# Checksum every chunk on write and check it on read (runtime/checksum.py).
verify: Annotated[bool, c.ENGINE] = True

# A failed write: "keep" the tensor in memory and go on, or "raise".
on_io_error: Annotated[Literal["keep", "raise"], c.ENGINE] = "keep"

# Staging buffers whose write finished are kept for reuse up to this many
# bytes: copying into memory used before is several times faster.
staging_pool_bytes: Annotated[int, c.AtLeast(0), c.ENGINE] = 128 << 20

install_config_module(sys.modules[__name__])
