"""Channel permutations around a clustered chain: fold them into neighbours, or a Gather.

A clustered chain (monochromatic, bicluster) makes its output channels in cluster order:
channel j of its output is original channel `order[j]`. Rather than a `Gather` back to the
original order, the permutation is FOLDED into what reads the tensor when every reader allows it:
- Conv (the tensor as its data input): permute weight axis 1; a grouped conv only when the
  permutation keeps every channel inside its group;
- BatchNormalization with constant scale, B, mean and var: permute all four;
- Add/Sub/Mul/Div/PRelu with a constant of per-channel shape ((C,1,1), (1,C,1,1)): permute it;
  a constant without a channel axis (a scalar) needs nothing;
- elementwise unary ops (Relu, LeakyRelu, Sigmoid, Clip with constant scalar bounds, ...) and
  MaxPool/AveragePool/global pools pass the order on to THEIR readers, recursively.
Anything else stops the fold: a graph output, an Add with a computed second input (a residual
branch), Concat, Reshape, Flatten, Gemm, a reader inside a subgraph, any unknown op. Then a
`Gather(axis=1, indices=inverse(order))` restores the order right after the chain.

The input side of a biclustered chain wants `x[in_order]`: the same rules, upwards, fold that
into the PRODUCER: a Conv whose output feeds only this chain (weight axis 0 and bias permuted),
possibly through BatchNormalization/elementwise nodes that feed only the next one, or an earlier
`Gather(axis=1)` (its indices composed). Edits never touch an existing constant: each permuted
parameter is a new `gs.Constant` named `{old}/perm`, and the edited node is marked `modified`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import constant_value
from .base import add_node

UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus", "Softsign",
    "HardSigmoid", "HardSwish", "Mish", "Gelu", "Erf", "Abs", "Neg", "Exp", "Sqrt", "Identity",
    "Cast", "Clip", "Dropout", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
    "GlobalMaxPool", "GlobalLpPool",
}  # fmt: skip
PER_CHANNEL = {"Add", "Sub", "Mul", "Div", "PRelu"}
_MAX_DEPTH = 64


@dataclass
class Fold:
    """The parameter edits that carry a permutation through the graph, not yet applied."""

    edits: list[tuple[gs.Node, int, np.ndarray]] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  # the nodes whose parameters change

    def edit(self, node: gs.Node, index: int, value: np.ndarray) -> None:
        self.edits.append((node, index, value))
        name = node.name or node.op
        if name not in self.nodes:
            self.nodes.append(name)


def plan_readers(graph: gs.Graph, tensor: gs.Tensor, order: np.ndarray) -> Fold | str:
    """Edits making every reader of `tensor` (now `original[order]`) compute as before, or the
    reason that cannot be done."""
    fold, top = Fold(), {id(n) for n in graph.nodes}
    reason = _plan_down(graph, top, tensor, order, fold, set(), 0)
    return reason or fold


def plan_producer(graph: gs.Graph, tensor: gs.Tensor, order: np.ndarray) -> Fold | str:
    """Edits making `tensor` hold `original[order]` by changing what produces it, or the
    reason that cannot be done."""
    fold, top, t = Fold(), {id(n) for n in graph.nodes}, tensor
    for _ in range(_MAX_DEPTH):
        if t in graph.outputs or len(t.outputs) != 1:
            return f"{t.name} is also read elsewhere"
        if not t.inputs:
            return f"{t.name} is a graph input"
        if id(t.inputs[0]) not in top:
            return f"{t.name} is made inside a subgraph"
        node = t.inputs[0]
        if node.op == "Conv":
            return _permute_conv_outputs(node, order, fold) or fold
        if node.op == "Gather":
            return _compose_gather(node, order, fold) or fold
        if len(node.outputs) != 1:
            return f"{_label(node)} has several outputs"
        source = _variable_input(node)
        if source is None:
            return f"{_label(node)} cannot take permuted channels"
        reason = _param_edits(node, source, order, fold)
        if reason:
            return reason
        t = source
    return "too deep"


def apply_fold(graph: gs.Graph, fold: Fold) -> None:
    """Swap in the permuted parameters as new constants and mark the nodes modified."""
    names = set(graph.tensors().keys())
    for node, index, value in fold.edits:
        old = node.inputs[index]
        name, i = f"{old.name}/perm", 1
        while name in names:
            i += 1
            name = f"{old.name}/perm{i}"
        names.add(name)
        node.inputs[index] = gs.Constant(name, np.ascontiguousarray(value))
        node.modified = True
        _drop_dead_constant(graph, old)


def insert_gather(
    graph: gs.Graph, anchor: gs.Node, source: gs.Tensor, target: gs.Tensor, indices, name: str
) -> gs.Node:
    """A `Gather(axis=1)` from `source` into `target`: output channel i = input `indices[i]`."""
    index = gs.Constant(f"{name}/indices", np.asarray(indices, dtype=np.int64))
    return add_node(graph, anchor, gs.Node("Gather", name, {"axis": 1}, [source, index], [target]))


def _plan_down(graph, top, tensor, order, fold: Fold, seen: set, depth: int) -> str | None:
    if tensor in graph.outputs:
        return f"{tensor.name} is a graph output"
    if depth > _MAX_DEPTH:
        return "too deep"
    for node in tensor.outputs:
        if id(node) not in top:
            return f"{tensor.name} is read inside a subgraph"
        if id(node) in seen:
            return f"{_label(node)} reads it twice"
        seen.add(id(node))
        if node.op == "Conv" and node.inputs[0] is tensor:
            reason = _permute_conv_inputs(node, order, fold)
        elif _variable_input(node) is tensor:
            reason = _param_edits(node, tensor, order, fold)
            for out in node.outputs[1:]:  # e.g. MaxPool's Indices, Dropout's mask
                if out.outputs or out in graph.outputs:
                    reason = reason or f"{_label(node)} has a second output in use"
            if reason is None:
                reason = _plan_down(graph, top, node.outputs[0], order, fold, seen, depth + 1)
        elif node.op == "Add":
            reason = f"{_label(node)} adds a computed tensor (a residual branch)"
        else:
            reason = f"{_label(node)} cannot take permuted channels"
        if reason:
            return reason
    return None


def _param_edits(node: gs.Node, data: gs.Tensor, order: np.ndarray, fold: Fold) -> str | None:
    """Permute the per-channel parameters of a channel-preserving node (data at input 0)."""
    channels = len(order)
    if node.op in UNARY:
        if node.op == "Clip":
            for t in node.inputs[1:]:
                value = constant_value(t) if t.name else np.zeros(1)
                if value is None or value.size != 1:
                    return f"{_label(node)} has computed or per-channel bounds"
        elif len(node.inputs) > 1 and node.op != "Dropout":
            return f"{_label(node)} cannot take permuted channels"
        return None
    if node.op == "BatchNormalization":
        for index in range(1, 5):
            value = constant_value(node.inputs[index])
            if value is None or value.shape != (channels,):
                return f"{_label(node)} has computed or non-per-channel parameters"
            fold.edit(node, index, value[order])
        return None
    if node.op in PER_CHANNEL and len(node.inputs) == 2:
        index = 1 - node.inputs.index(data)
        value = constant_value(node.inputs[index])
        if value is None:
            kind = "adds a computed tensor (a residual branch)" if node.op == "Add" else ""
            return f"{_label(node)} {kind or 'reads a computed second input'}"
        rank = _data_rank(data, value)
        axis = value.ndim - (rank - 1)  # the channel axis, broadcast from the right
        if value.ndim > rank:
            return f"{_label(node)} broadcasts to a higher rank"
        if axis >= 0 and value.shape[axis] == channels and channels > 1:
            fold.edit(node, index, np.take(value, order, axis=axis))
        elif axis >= 0 and value.shape[axis] != 1:
            return f"{_label(node)} has a constant of shape {list(value.shape)}"
        return None
    return f"{_label(node)} cannot take permuted channels"


def _permute_conv_inputs(node: gs.Node, order: np.ndarray, fold: Fold) -> str | None:
    """A reading Conv: weight[:, order], within each group for a grouped conv."""
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return f"{_label(node)} has a computed weight"
    per_group = weight.shape[1]
    group = len(order) // per_group
    if group * per_group != len(order):
        return f"{_label(node)} does not read {len(order)} channels"
    if np.any(order // per_group != np.arange(len(order)) // per_group):
        return f"grouped {_label(node)} would mix its groups"
    local = (order % per_group).reshape(group, per_group)
    index = local[np.arange(weight.shape[0]) // (weight.shape[0] // group)]
    index = index.reshape(*index.shape, *(1,) * (weight.ndim - 2))
    fold.edit(node, 1, np.take_along_axis(weight, index, axis=1))
    return None


def _permute_conv_outputs(node: gs.Node, order: np.ndarray, fold: Fold) -> str | None:
    """A producing Conv: weight[order] and bias[order], groups kept."""
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or len(weight) != len(order):
        return f"producer {_label(node)} has a computed or mismatched weight"
    per_group = len(order) // node.attrs.get("group", 1)
    if np.any(order // per_group != np.arange(len(order)) // per_group):
        return f"grouped producer {_label(node)} would mix its groups"
    has_bias = len(node.inputs) > 2 and node.inputs[2].name
    bias = constant_value(node.inputs[2]) if has_bias else None
    if has_bias and bias is None:
        return f"producer {_label(node)} has a computed bias"
    fold.edit(node, 1, weight[order])
    if bias is not None:
        fold.edit(node, 2, bias[order])
    return None


def _compose_gather(node: gs.Node, order: np.ndarray, fold: Fold) -> str | None:
    indices = constant_value(node.inputs[1])
    axis = node.attrs.get("axis", 0)
    if indices is None or indices.ndim != 1 or len(indices) != len(order) or axis != 1:
        return f"producer {_label(node)} is not a channel Gather"
    fold.edit(node, 1, indices[order])
    return None


def _variable_input(node: gs.Node) -> gs.Tensor | None:
    """The one input a channel-preserving node's channels come through (input 0, or PRelu's
    and the binary ops' only non-constant input)."""
    if not node.inputs:
        return None
    if node.op in PER_CHANNEL and len(node.inputs) == 2:
        computed = [t for t in node.inputs if constant_value(t) is None]
        return computed[0] if len(computed) == 1 else None
    return node.inputs[0] if node.op in UNARY or node.op == "BatchNormalization" else None


def _data_rank(data: gs.Tensor, value: np.ndarray) -> int:
    shape = getattr(data, "shape", None)
    return len(shape) if shape else max(4, value.ndim)


def _drop_dead_constant(graph: gs.Graph, tensor: gs.Tensor) -> None:
    """Remove a Constant node whose output nothing reads any more."""
    if tensor.outputs or tensor in graph.outputs or len(tensor.inputs) != 1:
        return
    producer = tensor.inputs[0]
    if producer.op == "Constant" and producer in graph.nodes:
        producer.outputs.clear()
        graph.nodes.remove(producer)


def _label(node: gs.Node) -> str:
    return f"{node.name} ({node.op})" if node.name else node.op
