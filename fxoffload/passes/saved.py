"""Find the values the forward graph saves for backward and classify each.

After the partitioner, the forward graph returns
``(*user_outputs, *saved_tensors, *saved_opaque, *saved_symints)``; the
backward graph takes the saved values as placeholders of the same names. Only
saved tensors that nobody else keeps alive are worth offloading; everything
else is classified with the reason it stays.
"""

from __future__ import annotations

import dataclasses
import enum

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from fxoffload._compat import size_hint

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
    UNSUPPORTED = "unsupported"
    """A tensor whose layout or use we cannot restore exactly."""


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

    @property
    def bytes_written(self) -> int:
        """Bytes this value's own store writes: 0 if kept or rebuilt from a base."""
        return self.nbytes if self.offload and self.rebuilt_from is None else 0


def saved_value_nodes(fw_gm: fx.GraphModule, num_fwd_outputs: int) -> list[fx.Node]:
    """The forward graph's saved values, in output-slot order."""
    (outputs,) = fw_gm.graph.find_nodes(op="output")
    return [n for n in outputs.args[0][num_fwd_outputs:] if isinstance(n, fx.Node)]


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
    bw_placeholders = {n.name: n for n in bw_gm.graph.find_nodes(op="placeholder")}

    records = []
    for node in saved_value_nodes(fw_gm, num_fwd_outputs):
        kind, reason = _classify(
            node,
            static=static,
            user_outputs=user_outputs,
            input_storages=input_storages,
            output_storages=output_storages,
            bw_node=bw_placeholders.get(node.name),
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
    tag_saved_values(fw_gm, bw_gm, records)
    return records


def tag_saved_values(
    fw_gm: fx.GraphModule, bw_gm: fx.GraphModule, records: list[SavedValue]
) -> None:
    """Store each record in ``meta[META_KEY]`` of its forward node and backward placeholder."""
    by_name = {r.name: r for r in records}
    for gm in (fw_gm, bw_gm):
        for node in gm.graph.nodes:
            if node.name in by_name and (gm is fw_gm or node.op == "placeholder"):
                node.meta[META_KEY] = by_name[node.name]


def _classify(
    node: fx.Node,
    *,
    static: set[fx.Node],
    user_outputs: list[fx.Node],
    input_storages: dict[StorageWeakRef, fx.Node],
    output_storages: dict[StorageWeakRef, fx.Node],
    bw_node: fx.Node | None,
) -> tuple[SavedKind, str]:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return SavedKind.NOT_TENSOR, f"{type(val).__name__}, not a tensor"
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
    as_strided = _as_strided_user(bw_node) if bw_node is not None else None
    if as_strided is not None:
        return SavedKind.UNSUPPORTED, (
            f"backward reads it with {as_strided.target}, which may address its base's storage"
        )
    if not dense:  # views.py stores its base for it, or keeps it
        return SavedKind.ACTIVATION, "activation, a view with gaps: offloaded through its base"
    return SavedKind.ACTIVATION, "activation: held only for backward"


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
    return isinstance(target, torch._ops.OpOverload) and target.is_view


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
