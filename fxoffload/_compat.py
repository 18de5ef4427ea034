"""Private torch APIs we rely on, imported in one place.

Each has moved between torch releases or may; each entry below names where
it lives and the torch versions it is known to work on. A missing one fails
here, with a message that names it, instead of deep inside a pass. The names
are resolved on first use (module ``__getattr__``): several pull in dynamo or
inductor, which ``import fxoffload.passes`` must not pay for.
"""

from __future__ import annotations

import dataclasses
import importlib

import torch


@dataclasses.dataclass(frozen=True)
class PrivateAPI:
    """Where a private torch API lives: the first of ``places`` that exists wins."""

    places: tuple[tuple[str, str | None], ...]
    """(module, attribute) pairs, newest torch first; attribute None: the module itself."""
    known_good: tuple[str, ...] = ("2.11", "2.13")
    """Torch versions it is known to work on."""

    def load(self) -> object:
        for module, attribute in self.places:
            try:
                found = importlib.import_module(module)
                return found if attribute is None else getattr(found, attribute)
            except (ImportError, AttributeError):
                continue
        wanted = " or ".join(m if a is None else f"{m}.{a}" for m, a in self.places)
        raise ImportError(
            f"fxoffload needs {wanted} (known to work on torch {', '.join(self.known_good)}); "
            f"torch {torch.__version__} has none of them"
        )


def _at(module: str, attribute: str | None = None) -> PrivateAPI:
    return PrivateAPI(((module, attribute),))


PRIVATE_APIS: dict[str, PrivateAPI] = {
    # Compiling: AOTAutograd with our partitioner, inductor or no compiler behind it.
    "aot_autograd": _at("torch._dynamo.backends.common", "aot_autograd"),
    "boxed_nop": _at("torch._dynamo.backends.debugging", "boxed_nop"),
    "compile_fx": _at("torch._inductor.compile_fx", "compile_fx"),
    "CustomPartitionerFn": _at("torch._inductor.custom_graph_pass", "CustomPartitionerFn"),
    "get_hash_for_files": _at("torch._inductor.custom_graph_pass", "get_hash_for_files"),
    "min_cut_rematerialization_partition": _at(
        "torch._functorch.partitioners", "min_cut_rematerialization_partition"
    ),
    "functorch_config": _at("torch._functorch.config"),
    "inductor_config": _at("torch._inductor.config"),
    # Lowering store and wait in inductor.
    "inductor_ir": _at("torch._inductor.ir"),
    "inductor_lowering": _at("torch._inductor.lowering"),
    "V": _at("torch._inductor.virtualized", "V"),
    # explain(): Dynamo's compiled code per code object, and resetting it.
    "reset_code": _at("torch._C._dynamo.eval_frame", "reset_code"),
    "dynamo_input_codes": _at("torch._dynamo.convert_frame", "input_codes"),
    "cache_entries": _at("torch._dynamo.eval_frame", "_debug_get_cache_entry_list"),
    # Graph passes and profiling.
    "OpOverload": _at("torch._ops", "OpOverload"),
    "real_tensors": _at("torch._subclasses.fake_tensor", "unset_fake_temporarily"),
    # simulate(): fake inputs, and the graph metadata that marks parameters as static.
    "FakeTensorMode": _at("torch._subclasses.fake_tensor", "FakeTensorMode"),
    "run_and_save_rng_state": _at("torch._prims.rng_prims", "run_and_save_rng_state"),
    "hint": PrivateAPI(
        (
            ("torch.fx.experimental.symbolic_shapes", "optimization_hint"),  # torch >= 2.12
            ("torch.fx.experimental.symbolic_shapes", "hint_int"),  # torch 2.11
        )
    ),
    # Configuration and logging.
    "Config": _at("torch.utils._config_module", "Config"),
    "install_config_module": _at("torch.utils._config_module", "install_config_module"),
    "trace_structured": _at("torch._logging", "trace_structured"),
}
"""``real_tensors``: a context in which tensor factories make real tensors even under a
fake mode. ``run_and_save_rng_state``: the higher-order op whose output 0 is the RNG state
checkpointed random ops save. ``hint``: a concrete value of a SymInt, adding no guard."""


def __getattr__(name: str) -> object:
    api = PRIVATE_APIS.get(name)
    if api is None:
        raise AttributeError(f"module 'fxoffload._compat' has no attribute {name!r}")
    value = globals()[name] = api.load()
    return value


def size_hint(value: int | torch.SymInt) -> int:
    """A concrete size for cost decisions; adds no guard under dynamic shapes."""
    hint = globals().get("hint") or __getattr__("hint")  # loaded once: a hot path of the passes
    return int(hint(value))


__all__ = [*PRIVATE_APIS, "PRIVATE_APIS", "PrivateAPI", "size_hint"]
