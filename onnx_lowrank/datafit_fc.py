"""Data-aware fitting of a fully connected layer (Gemm, or MatMul X @ W) on calibration data.

The same three steps as for convs (datafit.py): the second moment of the layer's input rows
weighs the low-rank fit (W' = W V_k V_k^T, metrics.whitened_low_rank); the second product is
then refitted by least squares, with the bias for a Gemm, so the layer's output matches the
original's on the calibration data; with `fit="weights"` only the bias moves. Layers it cannot
treat this way (W @ X, transA, a full-matrix C) keep the weight-only fit and say so."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .assemble import assemble
from .config import OptimizeConfig
from .datafit import DataContext, _batches, layer_batches
from .decompose.metrics import least_squares, residual
from .graph import constant_value
from .passes.gemm import FcLayer, FcSVDPass
from .report import LayerRecord


def fit_fc_layer(
    graph: gs.Graph, layer: FcLayer, fc_pass: FcSVDPass, config: OptimizeConfig, ctx: DataContext
) -> LayerRecord:
    """Whiten, factor, splice and refit one fully connected layer."""
    node = layer.node
    if layer.kind == "left" or node.attrs.get("transA", 0):
        record = fc_pass.rewrite(graph, layer, config)
        record.fit = "weights (no data fit for this form)" if record.status == "rewritten" else None
        return record
    cal = ctx.calibration
    x_name, y_name, origin = node.inputs[0].name, node.outputs[0].name, node.origin
    source = assemble(ctx.original, graph) if cal.sequential else ctx.original
    k = layer.matrix.shape[0]
    if cal.fit == "data" and cal.whiten:
        layer.moment = sum(
            _rows(b[x_name], k).T @ _rows(b[x_name], k) for b in _batches(ctx, source, [x_name])
        )
    record = fc_pass.rewrite(graph, layer, config)
    if record.status != "rewritten":
        return record
    first, second = [n for n in graph.nodes if getattr(n, "anchor", None) == origin]
    left = constant_value(first.inputs[1]).astype(np.float64)
    weight, bias = _effective(second)
    if bias is None:
        record.fit = "weights (bias is a full matrix)"
        return record
    with_bias = second.op == "Gemm"
    gram, cross, power = _statistics(ctx, source, x_name, y_name, left, with_bias)
    current = np.vstack([weight, bias[None]]) if with_bias else weight
    before = _relative(gram, cross, power, current)
    if cal.fit == "data":
        solution = least_squares(gram, cross)
        record.fit = "data: whitened + least squares" if cal.whiten else "data: least squares"
    else:
        mean_gap = (cross[-1] - gram[-1] @ current) / gram[-1, -1] if with_bias else 0.0
        solution = current + (np.eye(len(current))[-1][:, None] * mean_gap if with_bias else 0.0)
        record.fit = "weights + bias correction" if with_bias else "weights"
    after = _relative(gram, cross, power, solution)
    if after < before:
        _replace(second, solution, with_bias, layer.matrix.dtype)
    record.output_error_before, record.output_error_after = before, min(after, before)
    return record


def _rows(x: np.ndarray, k: int) -> np.ndarray:
    return np.asarray(x, np.float64).reshape(-1, k)


def _effective(second: gs.Node) -> tuple[np.ndarray, np.ndarray | None]:
    """The second product as y = z W + b (alpha and beta folded in)."""
    weight = constant_value(second.inputs[1]).astype(np.float64)
    out = weight.shape[1]
    if second.op != "Gemm":
        return weight, np.zeros(out)
    weight = weight * second.attrs.get("alpha", 1.0)
    if len(second.inputs) < 3:
        return weight, np.zeros(out)
    c = np.asarray(constant_value(second.inputs[2]), np.float64) * second.attrs.get("beta", 1.0)
    if c.size not in (1, out) or (c.ndim == 2 and c.shape[0] != 1):
        return weight, None
    return weight, np.broadcast_to(c.reshape(-1), (out,)).copy()


def _statistics(ctx, source, x_name, y_name, left, with_bias):
    batches = layer_batches(ctx, source, x_name, y_name)
    gram = cross = None
    power = 0.0
    for batch in batches:
        z = _rows(batch[x_name], left.shape[0]) @ left
        if with_bias:
            z = np.hstack([z, np.ones((len(z), 1))])
        y = np.asarray(batch[y_name], np.float64).reshape(len(z), -1)
        gram = z.T @ z if gram is None else gram + z.T @ z
        cross = z.T @ y if cross is None else cross + z.T @ y
        power += float(np.sum(y**2))
    return gram, cross, power


def _relative(gram, cross, power, solution) -> float:
    return float(np.sqrt(residual(gram, cross, power, solution) / power)) if power > 0 else 0.0


def _replace(second: gs.Node, solution: np.ndarray, with_bias: bool, dtype) -> None:
    """New constants for the refitted product (existing ones are never mutated)."""
    weight = solution[:-1] if with_bias else solution
    second.inputs[1] = gs.Constant(f"{second.name}/refit/weight", weight.astype(dtype))
    if with_bias:
        second.attrs["alpha"], second.attrs["beta"] = 1.0, 1.0
        new_bias = gs.Constant(f"{second.name}/refit/bias", solution[-1].astype(dtype))
        if len(second.inputs) > 2:
            second.inputs[2] = new_bias
        else:
            second.inputs.append(new_bias)
