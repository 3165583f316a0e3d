"""Fully connected SVD pass: a Gemm, or a MatMul with a constant 2-D weight, as two products.

- Gemm(A, B, C; alpha, beta, transA, transB) -> Gemm(A, L; transA) then Gemm(., alpha*R, C; beta)
  with op(B) ~ L R. Before opset 11 Gemm needs C, so the first product gets a zero one.
- MatMul(X, W) -> MatMul(X, L), MatMul(., R);  MatMul(W, X) -> MatMul(R, X), MatMul(L, .).
MACs are per sample: the first dim of an output with two or more dims is the batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..config import OptimizeConfig
from ..decompose.metrics import whitened_low_rank, whitened_matrix_spectrum
from ..decompose.svd import LowRankMatrix, low_rank_matrix, matrix_spectrum, relative_error
from ..graph import constant_value, static_dims
from ..report import LayerRecord
from .base import FLOAT_TYPES, RankedPass, _rank_text, add_node, remove_node


@dataclass
class FcLayer:
    """A Gemm/MatMul with a constant weight `matrix`: in x out for 'gemm'/'right', out x in
    for 'left' (W @ X)."""

    node: gs.Node
    kind: str  # "gemm", "right" (X @ W) or "left" (W @ X)
    matrix: np.ndarray
    rows: int
    moment: np.ndarray | None = None  # second moment of the input rows (data-aware fits)

    @property
    def macs(self) -> int:
        return self.rows * self.matrix.size


def read_fc(node: gs.Node) -> FcLayer | str:
    """The layer's facts, or why it is left alone."""
    if len(node.inputs) < 2:
        return f"{node.op} without two operands"
    first, second = (constant_value(t) for t in node.inputs[:2])
    if node.op == "Gemm":
        if second is None:
            return (
                "weight is computed at run time"
                if first is None
                else "constant is the first operand"
            )
        kind, weight = "gemm", second.T if node.attrs.get("transB", 0) else second
    elif second is not None and second.ndim == 2:
        kind, weight = "right", second
    elif first is not None and first.ndim == 2:
        kind, weight = "left", first
    elif first is None and second is None:
        return "no constant weight (both operands computed at run time)"
    else:
        return "constant weight is not 2-D (batched MatMul)"
    if weight.ndim != 2:
        return f"weight is {weight.ndim}-D"
    if weight.dtype.type not in FLOAT_TYPES:
        return f"weight dtype {weight.dtype} is not a float type"
    out = static_dims(node.outputs[0]) or []
    known = [d or 1 for d in out]
    if kind == "gemm":
        rows = 1
    elif kind == "right":
        rows = math.prod(known[1:-1]) if len(known) >= 2 else 1
    else:
        rows = (known[-1] if known else 1) * (math.prod(known[1:-2]) if len(known) >= 3 else 1)
    return FcLayer(node, kind, weight, rows)


class FcSVDPass(RankedPass):
    method = "fc-svd"

    def full_rank(self, layer: FcLayer) -> tuple[int, ...]:
        return (min(layer.matrix.shape),)

    def spectra(self, layer: FcLayer) -> list[list[np.ndarray]]:
        if layer.moment is not None:
            return [[whitened_matrix_spectrum(layer.matrix, layer.moment)]]
        return [[matrix_spectrum(layer.matrix)]]

    def chain_macs(self, layer: FcLayer, rank: tuple[int, ...]) -> int:
        return layer.rows * rank[0] * sum(layer.matrix.shape)

    def rewrite(self, graph: gs.Graph, layer: FcLayer, config: OptimizeConfig) -> LayerRecord:
        """Choose the rank, factor, splice the two products in, and say what was done."""
        record = LayerRecord(
            node=layer.node.name,
            op=layer.node.op,
            method=self.method,
            status="skipped",
            weight_shape=list(layer.matrix.shape),
            macs_before=layer.macs,
            params_before=int(layer.matrix.size),
        )
        rank = self.choose_rank(layer, config.target(self.method), config.rank_multiple)
        record.rank = rank[0]
        record.macs_after = self.chain_macs(layer, rank)
        record.params_after = rank[0] * sum(layer.matrix.shape)
        if record.macs_after >= record.macs_before and not config.force:
            record.reason = (
                f"no gain: the two products at rank {_rank_text(rank)} cost "
                f"{record.macs_after / record.macs_before:.2f}x the layer's MACs"
            )
            return record
        if layer.moment is not None:
            factors = whitened_low_rank(layer.matrix, rank[0], layer.moment)
        else:
            factors = low_rank_matrix(layer.matrix, rank[0])
        record.fit_error = relative_error(factors.reconstruct(), layer.matrix)
        splice_products(graph, layer, factors)
        record.status = "rewritten"
        return record


def splice_products(graph: gs.Graph, layer: FcLayer, factors: LowRankMatrix) -> None:
    """Replace the node by two products computing the factored weight."""
    node, dtype = layer.node, layer.matrix.dtype
    base = node.name or node.outputs[0].name
    weight = node.inputs[0 if layer.kind == "left" else 1]
    wname = f"{base}.weight" if len(weight.outputs) > 1 else weight.name
    left = gs.Constant(f"{wname}/fc-svd/0", np.ascontiguousarray(factors.left, dtype))
    right = gs.Constant(f"{wname}/fc-svd/1", np.ascontiguousarray(factors.right, dtype))
    middle = gs.Variable(f"{base}/fc-svd/0_out", dtype=dtype)
    if layer.kind == "gemm":
        attrs = node.attrs
        old_gemm = (graph.opset or 13) < 11
        first_in = [node.inputs[0], left]
        if old_gemm:
            first_in.append(gs.Constant(f"{wname}/fc-svd/zero", np.zeros(factors.rank, dtype)))
        scaled = gs.Constant(
            right.name, np.ascontiguousarray(attrs.get("alpha", 1.0) * factors.right, dtype)
        )
        second_in = [middle, scaled]
        if len(node.inputs) > 2 and node.inputs[2].name:
            second_in.append(node.inputs[2])
        elif old_gemm:
            second_in.append(
                gs.Constant(f"{wname}/fc-svd/zero_out", np.zeros(scaled.shape[1], dtype))
            )
        nodes = [
            ("Gemm", {"transA": attrs.get("transA", 0)}, first_in),
            ("Gemm", {"beta": attrs.get("beta", 1.0)}, second_in),
        ]
    elif layer.kind == "right":
        nodes = [("MatMul", {}, [node.inputs[0], left]), ("MatMul", {}, [middle, right])]
    else:  # W @ X = L (R X)
        nodes = [("MatMul", {}, [right, node.inputs[1]]), ("MatMul", {}, [left, middle])]
    outputs = [[middle], list(node.outputs)]
    for i, (op, attrs, inputs) in enumerate(nodes):
        add_node(graph, node, gs.Node(op, f"{base}/fc-svd/{i}", attrs, inputs, outputs[i]))
    remove_node(graph, node)
