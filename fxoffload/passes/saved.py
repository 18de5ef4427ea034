"""Find the values the forward graph saves for backward and classify each.

After the partitioner, the forward graph returns
``(*user_outputs, *saved_tensors, *saved_opaque, *saved_symints)`` and the
backward graph takes ``(*saved_symints, *saved_tensors, *saved_opaque, ...)``:
AOTAutograd passes saved values by position, and their names need not match
(the partitioner names a saved RNG state ``rng_state_output_0`` in backward).
So forward nodes and backward placeholders are paired here, once, by position,
and each backward placeholder carries its saved value's record in
``meta[META_KEY]``; later passes find it there. Only saved tensors that nobody
else keeps alive are worth offloading; everything else is classified with the
reason it stays.
"""

from __future__ import annotations

import dataclasses
import enum
import operator

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from fxoffload._compat import OpOverload, run_and_save_rng_state, size_hint

META_KEY = "fxoffload"
"""``node.meta`` key holding a node's :class:`SavedValue` (forward and backward)."""

_AS_STRIDED_OPS = (
    torch.ops.aten.as_strided.default,
    torch.ops.aten.as_strided_.default,
    torch.ops.aten.as_strided_scatter.default,
)


class SavedKind(enum.Enum):
    ACTIVATION = "activation"
    """Made by forward and held only for backward: a candidate."""
    STATIC_INPUT = "static input"
    """A parameter or buffer: lives for the whole run anyway."""
    INPUT = "input"
    """A forward input or a view of one: its memory belongs to the caller."""
    OUTPUT = "output"
    """Also returned by forward (or a view of a returned tensor): alive anyway."""
    NOT_TENSOR = "not a tensor"
    """A symint or opaque object: nothing to offload."""
    EMPTY = "empty"
    """No elements (an op's unused workspace, which may even be None at run time): kept."""
    RNG_STATE = "rng state"
    """A generator's state, saved so that backward replays a random op exactly: kept."""
    UNSUPPORTED = "unsupported"
    """A tensor whose layout or use we cannot restore exactly."""
    RECOMPUTED = "recomputed"
    """Saved without a memory budget; under ``memory_budget`` backward recomputes it."""


@dataclasses.dataclass(frozen=True)
class SavedValue:
    """One saved value and what the passes decided for it.

    ``nbytes`` is a concrete hint (under dynamic shapes, for the example
    sizes). ``offload`` and ``reason`` start as the classification's and are
    final after planning. ``rebuilt_from`` names the base an offloaded view
    is rebuilt from in backward (its bytes are written as the base's).
    """

    name: str
    kind: SavedKind
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    nbytes: int
    offload: bool
    reason: str
    rebuilt_from: str | None = None
    is_saved: bool = True
    """False for a base stored only for its saved views: it is not itself a saved value."""

    @property
    def bytes_written(self) -> int:
        """Bytes this value's own store writes: 0 if kept or rebuilt from a base."""
        return self.nbytes if self.offload and self.rebuilt_from is None else 0


def saved_value_nodes(fw_gm: fx.GraphModule, num_fwd_outputs: int) -> list[fx.Node]:
    """The forward graph's saved values, in output-slot order."""
    (outputs,) = fw_gm.graph.find_nodes(op="output")
    return [n for n in outputs.args[0][num_fwd_outputs:] if isinstance(n, fx.Node)]


def pair_saved_values(
    fw_gm: fx.GraphModule, bw_gm: fx.GraphModule, num_fwd_outputs: int
) -> list[tuple[fx.Node, fx.Node]]:
    """Each saved value's forward node with the backward placeholder it is passed to.

    By position, as AOTAutograd passes them: the symints that forward returns
    last, backward takes first. Raises if the two graphs disagree on a saved
    tensor's dtype or rank, which would mean that convention has changed.
    """
    saved = saved_value_nodes(fw_gm, num_fwd_outputs)
    inputs = bw_gm.graph.find_nodes(op="placeholder")
    symbolic = 0
    while symbolic < len(saved) and _is_symbolic(saved[len(saved) - 1 - symbolic].meta.get("val")):
        symbolic += 1
    others = len(saved) - symbolic
    order = inputs[symbolic : symbolic + others] + inputs[:symbolic]
    if len(order) != len(saved):
        raise RuntimeError(
            f"fxoffload: forward saves {len(saved)} values but backward takes "
            f"{len(inputs)} inputs; cannot pair them"
        )
    for fw_node, bw_node in zip(saved, order, strict=True):
        fw_val, bw_val = fw_node.meta.get("val"), bw_node.meta.get("val")
        if isinstance(fw_val, torch.Tensor) and not (
            isinstance(bw_val, torch.Tensor)
            and bw_val.dtype == fw_val.dtype
            and bw_val.dim() == fw_val.dim()
        ):
            raise RuntimeError(
                f"fxoffload: saved value {fw_node.name} ({fw_val.dtype}, {fw_val.dim()} dims) "
                f"does not match backward input {bw_node.name} at its position"
            )
    return list(zip(saved, order, strict=True))


def backward_inputs(bw_graph: fx.Graph) -> dict[str, fx.Node]:
    """Each saved value's backward placeholder, by the saved value's (forward) name."""
    return {
        n.meta[META_KEY].name: n
        for n in bw_graph.find_nodes(op="placeholder")
        if META_KEY in n.meta
    }


def classify_saved_values(
    fw_gm: fx.GraphModule,
    bw_gm: fx.GraphModule,
    *,
    num_fwd_outputs: int,
    static_input_indices: list[int] | None,
) -> list[SavedValue]:
    """Classify every saved value; tags forward and backward nodes with ``META_KEY``."""
    placeholders = fw_gm.graph.find_nodes(op="placeholder")
    static = {placeholders[i] for i in static_input_indices or () if i < len(placeholders)}
    (outputs,) = fw_gm.graph.find_nodes(op="output")
    user_outputs = [n for n in outputs.args[0][:num_fwd_outputs] if isinstance(n, fx.Node)]
    input_storages = _storages(placeholders)
    output_storages = _storages(user_outputs)

    records = []
    for node, bw_node in pair_saved_values(fw_gm, bw_gm, num_fwd_outputs):
        kind, reason = _classify(
            node,
            static=static,
            user_outputs=user_outputs,
            input_storages=input_storages,
            output_storages=output_storages,
            bw_node=bw_node,
        )
        val = node.meta.get("val")
        is_tensor = isinstance(val, torch.Tensor)
        record = SavedValue(
            name=node.name,
            kind=kind,
            shape=tuple(val.shape) if is_tensor else None,
            dtype=val.dtype if is_tensor else None,
            nbytes=tensor_nbytes(val) if is_tensor else 0,
            offload=kind is SavedKind.ACTIVATION,
            reason=reason,
        )
        records.append(record)
        node.meta[META_KEY] = bw_node.meta[META_KEY] = record
    return records


def tag_saved_values(
    fw_gm: fx.GraphModule, bw_gm: fx.GraphModule, records: list[SavedValue]
) -> None:
    """Replace the records in ``meta[META_KEY]`` of the forward nodes and backward placeholders.

    Forward nodes are found by name; backward placeholders by the record
    ``classify_saved_values`` left on them.
    """
    by_name = {r.name: r for r in records}
    for node in fw_gm.graph.nodes:
        if node.name in by_name:
            node.meta[META_KEY] = by_name[node.name]
    for name, node in backward_inputs(bw_gm.graph).items():
        node.meta[META_KEY] = by_name[name]


def _classify(
    node: fx.Node,
    *,
    static: set[fx.Node],
    user_outputs: list[fx.Node],
    input_storages: dict[StorageWeakRef, fx.Node],
    output_storages: dict[StorageWeakRef, fx.Node],
    bw_node: fx.Node,
) -> tuple[SavedKind, str]:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return SavedKind.NOT_TENSOR, f"{type(val).__name__}, not a tensor"
    if size_hint(val.numel()) == 0:
        return SavedKind.EMPTY, "no elements: nothing to write (it may be None at run time)"
    if _is_rng_state(node):
        return SavedKind.RNG_STATE, (
            "RNG state that backward replays a random op with: a few KB, kept"
        )
    if node in static:
        return SavedKind.STATIC_INPUT, "parameter or buffer: lives for the whole run"
    if node.op == "placeholder":
        return SavedKind.INPUT, "forward input: the caller holds it"
    if node in user_outputs:
        return SavedKind.OUTPUT, "also returned by forward: alive anyway"
    if val.layout != torch.strided or val.is_sparse or val.is_quantized:
        return SavedKind.UNSUPPORTED, f"layout {val.layout} cannot be stored as raw bytes"
    storage = StorageWeakRef(val.untyped_storage())
    if storage in input_storages:
        return SavedKind.INPUT, f"view of forward input {input_storages[storage].name}"
    if storage in output_storages:
        return SavedKind.OUTPUT, f"view of forward output {output_storages[storage].name}"
    dense = dense_dim_order(val) is not None
    if not dense and not is_view(node):
        return SavedKind.UNSUPPORTED, (
            f"strides {list(val.stride())} leave gaps or overlap: only dense layouts are restored"
        )
    as_strided = _as_strided_user(bw_node)
    if as_strided is not None:
        return SavedKind.UNSUPPORTED, (
            f"backward reads it with {as_strided.target}, which may address its base's storage"
        )
    if not dense:  # views.py stores its base for it, or keeps it
        return SavedKind.ACTIVATION, "activation, a view with gaps: offloaded through its base"
    return SavedKind.ACTIVATION, "activation: held only for backward"


def _is_symbolic(val: object) -> bool:
    return isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _is_rng_state(node: fx.Node) -> bool:
    """Whether ``node`` is the state half of ``run_and_save_rng_state`` (checkpointed dropout)."""
    if node.target is not operator.getitem or node.args[1] != 0:
        return False
    source = node.args[0]
    return isinstance(source, fx.Node) and source.target is run_and_save_rng_state


def _as_strided_user(node: fx.Node) -> fx.Node | None:
    """An ``as_strided`` reading ``node`` directly or through views of it.

    Its storage offset and strides address the storage, not the view: a
    restored tensor starts a storage of its own, so they would read other bytes.
    """
    pending = [node]
    while pending:
        current = pending.pop()
        for user in current.users:
            if user.target in _AS_STRIDED_OPS:
                return user
            if is_view(user) and user.args[0] is current:
                pending.append(user)
    return None


def is_view(node: fx.Node) -> bool:
    """Whether ``node`` is a view op (its output shares its first argument's memory)."""
    target = node.target
    return isinstance(target, OpOverload) and target.is_view


def tensor_nbytes(val: torch.Tensor) -> int:
    """Bytes of ``val``'s elements, for the size hints under dynamic shapes (adds no guard)."""
    return size_hint(val.numel()) * val.element_size()


def dense_dim_order(val: torch.Tensor) -> list[int] | None:
    """Dimensions from outermost to innermost if ``val`` is dense, else None.

    Decided on size hints, so it adds no guard under dynamic shapes. Size-1
    dimensions keep their logical position among equal strides.
    """
    sizes = [size_hint(s) for s in val.shape]
    strides = [size_hint(s) for s in val.stride()]
    order = sorted(range(val.dim()), key=lambda d: -strides[d])
    expected = 1
    for d in reversed(order):
        if sizes[d] != 1 and strides[d] != expected:
            return None
        expected *= sizes[d]
    return order


def _storages(nodes: list[fx.Node]) -> dict[StorageWeakRef, fx.Node]:
    found = {}
    for n in nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.layout == torch.strided:
            found.setdefault(StorageWeakRef(val.untyped_storage()), n)
    return found
