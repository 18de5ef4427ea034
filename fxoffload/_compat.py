"""Private torch APIs we rely on, imported in one place.

Each has moved between torch releases; a missing one fails here with a
message that names it instead of deep inside a pass.
"""

from __future__ import annotations

import torch

try:
    from torch.fx.experimental.symbolic_shapes import optimization_hint as _hint
except ImportError:  # torch < 2.12
    try:
        from torch.fx.experimental.symbolic_shapes import hint_int as _hint
    except ImportError as e:
        raise ImportError(
            f"fxoffload needs torch.fx.experimental.symbolic_shapes.optimization_hint or "
            f"hint_int; torch {torch.__version__} has neither"
        ) from e

try:
    from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files
except ImportError as e:
    raise ImportError(
        f"fxoffload needs torch._inductor.custom_graph_pass.CustomPartitionerFn "
        f"(torch >= 2.11); torch {torch.__version__} lacks it"
    ) from e


try:
    from torch._subclasses.fake_tensor import unset_fake_temporarily as real_tensors
except ImportError as e:
    raise ImportError(
        f"fxoffload needs torch._subclasses.fake_tensor.unset_fake_temporarily; "
        f"torch {torch.__version__} lacks it"
    ) from e
"""A context in which tensor factories make real tensors even under a fake mode."""

try:
    from torch._prims.rng_prims import run_and_save_rng_state
except ImportError as e:
    raise ImportError(
        f"fxoffload needs torch._prims.rng_prims.run_and_save_rng_state; "
        f"torch {torch.__version__} lacks it"
    ) from e
"""The higher-order op whose output 0 is the RNG state checkpointed random ops save."""


def size_hint(value: int | torch.SymInt) -> int:
    """A concrete size for cost decisions; adds no guard under dynamic shapes."""
    return int(_hint(value))


__all__ = [
    "CustomPartitionerFn",
    "get_hash_for_files",
    "real_tensors",
    "run_and_save_rng_state",
    "size_hint",
]
