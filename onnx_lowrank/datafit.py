"""Data-aware fitting of one conv layer on calibration data, without backpropagation.

Per layer, in graph order (sequential mode: on inputs produced by the already compressed upstream
layers, so their error is corrected here; otherwise on the original model's inputs):
1. whitening (methods whose pass names patches): the second moment of the layer's input patches
   weighs the factorization (Denton eq. 3) — for tucker2 and cp, whose chain opens with a 1x1
   conv, that of the input channels;
2. the pass factors and splices its chain;
3. data reconstruction (`fit="data"`): the chain's last Conv is refitted by least squares so
   the chain's output matches the ORIGINAL layer's output on the calibration data; bias
   correction (`fit="weights"`): only the last Conv's bias moves, so each output channel's mean
   matches the original's.
Only accumulated statistics are kept (Gram matrices over sampled output positions), never all
activations, so memory stays bounded by one batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from .assemble import assemble
from .calibrate import Samples, fixed_batch
from .config import Calibration, OptimizeConfig
from .decompose.metrics import RIDGE, cross_validated_ridge, least_squares, residual
from .errors import LowRankError
from .graph import ConvGeometry, constant_value, conv_geometry, default_opset
from .passes.base import ConvLayer, ConvPass
from .report import LayerRecord
from .runtime import session

log = logging.getLogger(__name__)
POSITIONS = 64  # output positions sampled per image for the statistics
PLAN_ROWS = 4096  # input patches per layer kept for the planner's output-error estimates
PLAN_BYTES = 1 << 30  # patches held at once: layers are sampled in chunks within this


@dataclass
class DataContext:
    """What every layer's data fit needs: the model before any rewrite and the samples."""

    original: onnx.ModelProto
    samples: Samples
    calibration: Calibration
    seed: int = 0


def fit_layer(
    graph: gs.Graph, layer: ConvLayer, conv_pass: ConvPass, config: OptimizeConfig, ctx: DataContext
) -> LayerRecord:
    """Whiten, factor, splice and refit one layer; the record says which fit was used."""
    cal = ctx.calibration
    x_name, y_name, origin = (
        layer.node.inputs[0].name,
        layer.node.outputs[0].name,
        layer.node.origin,
    )
    source = assemble(ctx.original, graph) if cal.sequential else ctx.original
    geometry = conv_pass.whitening(layer) if cal.fit == "data" and cal.whiten else None
    if geometry is not None:
        layer.moments = _moments(_batches(ctx, source, [x_name]), x_name, geometry, ctx.seed)
    record = conv_pass.rewrite(graph, layer, config)
    if record.status != "rewritten":
        return record
    chain = [n for n in graph.nodes if getattr(n, "anchor", None) == origin]
    last, order = _last_conv(chain)
    stats = _statistics(ctx, source, chain, last, order, x_name, y_name)
    weight = constant_value(last.inputs[1])
    bias = constant_value(last.inputs[2]) if len(last.inputs) > 2 else None
    bias = bias if bias is not None else np.zeros(len(weight), weight.dtype)
    before = stats.error(weight, bias)
    if cal.fit == "data":
        new_weight, new_bias, ridge = stats.solve(weight, bias)
        record.fit = "data: whitened + least squares" if geometry else "data: least squares"
        record.fit += f" (ridge {ridge:g})" if ridge is not None else " (refit kept out: overfits)"
    else:
        new_weight, new_bias = (
            weight,
            (bias + stats.mean_target - stats.mean_output).astype(bias.dtype),
        )
        record.fit = "weights + bias correction"
    after = stats.error(new_weight, new_bias)
    if after > before:  # never worse than the plain fit (the ridge can, on a tiny sample)
        new_weight, new_bias, after = weight, bias, before
    else:
        _replace(last, new_weight, new_bias)
    record.output_error_before, record.output_error_after = before, after
    return record


def refit_kept(graph: gs.Graph, record: LayerRecord, ctx: DataContext) -> LayerRecord:
    """A conv left as it is (`record`: skipped), refitted by least squares so its output on
    the inputs the already compressed layers above give it matches the original model's: the
    closed-form correction of the error accumulated upstream. Only in sequential data fits,
    only below a rewritten layer, and only where the held-out check says the refit helps."""
    cal = ctx.calibration
    node = next((n for n in graph.nodes if n.name == record.node), None)
    if not (cal.fit == "data" and cal.sequential and cal.refit_kept) or node is None:
        return record
    if node.op != "Conv" or all(getattr(n, "anchor", None) is None for n in graph.nodes):
        return record  # nothing above it changed yet
    weight = constant_value(node.inputs[1])
    if weight is None or weight.ndim != 4:
        return record
    bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 else None
    bias = bias if bias is not None else np.zeros(len(weight), weight.dtype)
    x_name, y_name = node.inputs[0].name, node.outputs[0].name
    stats = _statistics(ctx, assemble(ctx.original, graph), [node], node, None, x_name, y_name)
    before = stats.error(weight, bias)
    new_weight, new_bias, ridge = stats.solve(weight, bias)
    after = stats.error(new_weight, new_bias)
    if ridge is None or after >= before:
        return record
    _replace(node, new_weight, new_bias)
    node.modified = True  # assemble() exports it instead of copying the original proto
    record.fit = f"data: kept, refitted to the compressed upstream (ridge {ridge:g})"
    record.output_error_before, record.output_error_after = before, after
    return record


def _last_conv(chain: list[gs.Node]) -> tuple[gs.Node, np.ndarray | None]:
    """The chain's last Conv, and the order a trailing Gather applies to its output channels."""
    last = [n for n in chain if n.op == "Conv"][-1]
    gathers = [n for n in chain[chain.index(last) + 1 :] if n.op == "Gather"]
    return last, (constant_value(gathers[-1].inputs[1]) if gathers else None)


def _batches(ctx: DataContext, model: onnx.ModelProto, names: list[str]):
    """Yield {name: array} per calibration batch from `model` with the named tensors exposed."""
    sess = session(upstream(model, names), optimize=False)
    fixed = fixed_batch(model, ctx.samples)
    if fixed and len(ctx.samples) < fixed:
        raise LowRankError(
            f"the model's batch is fixed at {fixed}; the calibration data has only "
            f"{len(ctx.samples)} samples"
        )
    for feed in ctx.samples.batches(fixed or ctx.calibration.batch):
        if fixed and len(next(iter(feed.values()))) != fixed:
            continue  # the incomplete last batch of a fixed-batch model
        yield dict(zip(names, sess.run(names, feed)))


def upstream(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """`model` cut down to the nodes the named tensors depend on, with those tensors as its
    outputs (all graph inputs kept, so any feed of the model still fits). A layer's input needs
    only the graph above it: in sequential mode this halves the calibration passes on average.
    Graphs with subgraph-holding nodes (If, Loop, Scan) are kept whole."""
    graph = model.graph
    probe = onnx.ModelProto()
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    ):
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
        return probe
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    keep, stack = set(), list(names)
    while stack:
        index = producer.get(stack.pop())
        if index is not None and index not in keep:
            keep.add(index)
            stack.extend(graph.node[index].input)
    nodes = [n for i, n in enumerate(graph.node) if i in keep]
    used = {t for n in nodes for t in n.input} | set(names) | {i.name for i in graph.input}
    probe.ir_version = model.ir_version
    probe.opset_import.extend(model.opset_import)
    probe.functions.extend(model.functions)
    probe.graph.name = graph.name
    probe.graph.node.extend(nodes)
    probe.graph.input.extend(graph.input)
    probe.graph.initializer.extend(t for t in graph.initializer if t.name in used)
    probe.graph.sparse_initializer.extend(
        t for t in graph.sparse_initializer if t.values.name in used
    )
    probe.graph.value_info.extend(v for v in graph.value_info if v.name in used)
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return probe


def layer_batches(ctx: DataContext, source: onnx.ModelProto, x_name: str, y_name: str):
    """Per batch, the layer's input in `source` (the compressed model in sequential mode) and
    its output in the original model (the target)."""
    if source is ctx.original:
        return _batches(ctx, ctx.original, [x_name, y_name])
    return (
        {**a, **b}
        for a, b in zip(_batches(ctx, source, [x_name]), _batches(ctx, ctx.original, [y_name]))
    )


def _moments(batches, name: str, geometry: ConvGeometry, seed: int) -> list[np.ndarray]:
    """Per group, the second moment of the input patches `geometry` reads."""
    rng = np.random.default_rng(seed)
    geo = _geometry_2d(geometry)
    moments = None
    for batch in batches:
        x = _as_2d(batch[name])
        grams = patch_moments(_patches(x, geo, _positions(rng, geo, x.shape[2:])), geo.group)
        moments = grams if moments is None else [m + g for m, g in zip(moments, grams)]
    return moments


def input_patches(ctx: DataContext, layers: list[ConvLayer]) -> dict[str, np.ndarray]:
    """Per layer (node name): up to PLAN_ROWS input patches (rows, C, kH, kW), float32, spread
    over the calibration samples of the ORIGINAL model; one pass over the data per chunk of
    layers whose patches fit in PLAN_BYTES."""
    per_image = max(1, -(-PLAN_ROWS // max(1, len(ctx.samples))))
    chunks, chunk, held = [], [], 0
    for layer in layers:
        size = PLAN_ROWS * layer.weight[0].size * layer.group * 4
        if chunk and held + size > PLAN_BYTES:
            chunks.append(chunk)
            chunk, held = [], 0
        chunk.append(layer)
        held += size
    chunks += [chunk] if chunk else []
    rng = np.random.default_rng(ctx.seed + 2)
    out: dict[str, np.ndarray] = {}
    for chunk in chunks:
        names = list(dict.fromkeys(layer.node.inputs[0].name for layer in chunk))
        parts: dict[str, list[np.ndarray]] = {layer.node.name: [] for layer in chunk}
        for batch in _batches(ctx, ctx.original, names):
            for layer in chunk:
                x = _as_2d(batch[layer.node.inputs[0].name])
                geo = _geometry_2d(layer.geometry)
                positions = _positions(rng, geo, x.shape[2:], count=per_image)
                parts[layer.node.name].append(_patches(x, geo, positions).astype(np.float32))
        for name, rows in parts.items():
            out[name] = np.concatenate(rows)[:PLAN_ROWS]
    return out


def patch_moments(patches: np.ndarray, group: int, kernel: tuple[int, ...] | None = None):
    """Per group, the second moment of `patches` (rows, C, kH, kW); with `kernel` (kH, 1), of
    their kH x 1 columns (the input patches of a separable chain's vertical conv); with a 1x1
    `kernel`, of the channel vectors at every position (what a chain's first 1x1 conv reads)."""
    moments = []
    for part in np.split(patches.astype(np.float64), group, axis=1):
        if kernel is not None and all(k == 1 for k in kernel):
            flat = np.moveaxis(part, 1, -1).reshape(-1, part.shape[1])
        elif kernel is not None and kernel[-1] == 1 and part.shape[-1] > 1:
            # every column is a patch of the kH x 1 conv: (rows * kW, C * kH)
            flat = part.transpose(0, 3, 1, 2).reshape(-1, part.shape[1] * part.shape[2])
        else:
            flat = part.reshape(len(part), -1)
        moments.append(flat.T @ flat)
    return moments


def patch_output_error(
    weight: np.ndarray, approx: np.ndarray, patches: np.ndarray, group: int
) -> float:
    """Relative error of the layer's output (bias aside) on `patches` when `approx` replaces
    `weight`: ||(W - W') P|| / ||W P||."""
    num = den = 0.0
    parts = np.split(patches.astype(np.float64), group, axis=1)
    for w, a, p in zip(np.split(weight, group), np.split(approx, group), parts):
        flat = p.reshape(len(p), -1).T
        num += float(np.sum(((w - a).reshape(len(w), -1).astype(np.float64) @ flat) ** 2))
        den += float(np.sum((w.reshape(len(w), -1).astype(np.float64) @ flat) ** 2))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


@dataclass
class _Stats:
    """Per group of the last conv: Gram of its input patches with a ones column (the bias),
    cross product with the target, and target power; per-channel means for bias correction."""

    grams: list[np.ndarray]
    crosses: list[np.ndarray]
    powers: list[float]
    mean_target: np.ndarray
    mean_output: np.ndarray
    fold0: tuple | None = None  # (grams, crosses, powers) of the even batches; None: one batch

    def _solutions(self, weight: np.ndarray, bias: np.ndarray):
        flat = weight.reshape(len(weight), -1).astype(np.float64)
        for rows in np.array_split(np.arange(len(weight)), len(self.grams)):
            yield np.vstack([flat[rows].T, bias[rows][None].astype(np.float64)])

    def _residual(self, weight: np.ndarray, bias: np.ndarray) -> float:
        """Squared output error of the last conv with these weights, on the sampled data."""
        solutions = self._solutions(weight, bias)
        return sum(
            residual(g, c, p, s)
            for g, c, p, s in zip(self.grams, self.crosses, self.powers, solutions)
        )

    def error(self, weight: np.ndarray, bias: np.ndarray) -> float:
        """Relative output error of the last conv with these weights, on the sampled data."""
        power = sum(self.powers)
        return float(np.sqrt(self._residual(weight, bias) / power)) if power > 0 else 0.0

    def solve(self, weight: np.ndarray, bias: np.ndarray):
        """Least-squares weights and bias of the last conv, with the ridge that predicts
        held-out data best (two folds of the calibration batches); the given ones, and ridge
        None, when no refit beats them on held-out data. The ridge shrinks towards the given
        weights, not towards zero, so a strong one keeps most of the fit and a weak one trusts
        the data."""
        ridge = RIDGE
        priors = list(self._solutions(weight, bias))
        if self.fold0 is not None:
            folds = [
                ((g0, c0, p0), (g - g0, c - c0, p - p0))
                for g, c, p, g0, c0, p0 in zip(self.grams, self.crosses, self.powers, *self.fold0)
            ]
            ridge, held = cross_validated_ridge(folds, priors)
            if held >= self._residual(weight, bias):
                return weight, bias, None
        solutions = [
            least_squares(g, c, ridge, p) for g, c, p in zip(self.grams, self.crosses, priors)
        ]
        new_weight = np.concatenate([s[:-1].T for s in solutions]).reshape(weight.shape)
        new_bias = np.concatenate([s[-1] for s in solutions])
        return new_weight.astype(weight.dtype), new_bias.astype(weight.dtype), ridge


def _statistics(ctx, source, chain, last, order, x_name: str, y_name: str) -> _Stats:
    """Run the chain on the layer's inputs and the original model for its targets."""
    rng = np.random.default_rng(ctx.seed + 1)
    z_name, out_name = last.inputs[0].name, last.outputs[0].name
    lone = z_name == x_name  # a lone conv (a kept layer): its input is the layer input
    names = [out_name] if lone else [z_name, out_name]
    mini = session(_chain_model(ctx.original, chain, x_name, names), optimize=False)
    batches = layer_batches(ctx, source, x_name, y_name)
    kernel = tuple(constant_value(last.inputs[1]).shape[2:])
    geo = _geometry_2d(conv_geometry(last.attrs, kernel, None))  # chain convs: explicit pads
    acc: dict = {"grams": None, "crosses": None, "powers": None, "sum_t": 0.0, "sum_o": 0.0, "n": 0}
    fold0: dict = {"grams": None, "crosses": None, "powers": None}
    count = 0
    for count, batch in enumerate(batches, 1):
        values = mini.run(names, {x_name: batch[x_name]})
        z, out = (batch[x_name] if lone else values[0]), values[-1]
        y = batch[y_name] if order is None else batch[y_name][:, np.argsort(order)]
        new = _accumulate(acc, rng, geo, _as_2d(z), _as_2d(y), _as_2d(out))
        if count % 2:  # odd-numbered batches: the first fold for choosing the ridge
            _add(fold0, *new)
    return _Stats(
        acc["grams"],
        acc["crosses"],
        acc["powers"],
        acc["sum_t"] / acc["n"],
        acc["sum_o"] / acc["n"],
        (fold0["grams"], fold0["crosses"], fold0["powers"]) if count > 1 else None,
    )


def _add(acc: dict, grams, crosses, powers) -> None:
    for key, new in (("grams", grams), ("crosses", crosses), ("powers", powers)):
        acc[key] = new if acc[key] is None else [a + b for a, b in zip(acc[key], new)]


def _accumulate(acc: dict, rng, geo: ConvGeometry, z, y, out) -> tuple[list, list, list]:
    rows, cols = _positions(rng, geo, z.shape[2:], y.shape[2:])
    patches = _patches(z, geo, (rows, cols))
    target = y[:, :, rows, cols].transpose(0, 2, 1).reshape(-1, y.shape[1]).astype(np.float64)
    grams, crosses, powers = [], [], []
    for p, t in zip(np.split(patches, geo.group, 1), np.split(target, geo.group, 1)):
        flat = np.hstack([p.reshape(len(p), -1).astype(np.float64), np.ones((len(p), 1))])
        grams.append(flat.T @ flat)
        crosses.append(flat.T @ t)
        powers.append(float(np.sum(t**2)))
    _add(acc, grams, crosses, powers)
    acc["sum_t"] = acc["sum_t"] + y.astype(np.float64).sum(axis=(0, 2, 3))
    acc["sum_o"] = acc["sum_o"] + out.astype(np.float64).sum(axis=(0, 2, 3))
    acc["n"] += y.shape[0] * y.shape[2] * y.shape[3]
    return grams, crosses, powers


def _chain_model(
    original: onnx.ModelProto, chain: list[gs.Node], x_name: str, outputs: list[str]
) -> onnx.ModelProto:
    """A model of the chain's nodes alone: the layer input in, the named tensors out."""
    nodes = [OnnxExporter.export_node(n) for n in chain]
    inits, seen = [], set()
    for n in chain:
        for t in n.inputs:
            if isinstance(t, gs.Constant) and t.name not in seen:
                seen.add(t.name)
                inits.append(OnnxExporter.export_tensor_proto(t))
            elif t.name != x_name and constant_value(t) is not None and t.name not in seen:
                seen.add(t.name)  # a weight held elsewhere (e.g. the original bias)
                inits.append(onnx.numpy_helper.from_array(constant_value(t), t.name))
    graph = onnx.helper.make_graph(
        nodes,
        "chain",
        [onnx.ValueInfoProto(name=x_name)],
        [onnx.ValueInfoProto(name=n) for n in outputs],
        inits,
    )
    graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    opset = onnx.helper.make_opsetid("", default_opset(original) or 13)
    return onnx.helper.make_model(graph, opset_imports=[opset], ir_version=original.ir_version)


def _replace(conv: gs.Node, weight: np.ndarray, bias: np.ndarray) -> None:
    """New constants for the refitted weight and bias (existing ones are never mutated)."""
    base = conv.name
    conv.inputs[1] = gs.Constant(f"{base}/refit/weight", np.ascontiguousarray(weight))
    new_bias = gs.Constant(f"{base}/refit/bias", np.ascontiguousarray(bias))
    if len(conv.inputs) > 2:
        conv.inputs[2] = new_bias
    else:
        conv.inputs.append(new_bias)


def _geometry_2d(g: ConvGeometry) -> ConvGeometry:
    """A 1-D conv's geometry as a 2-D one of height 1."""
    if len(g.kernel) == 2:
        return g
    return ConvGeometry(
        (1, *g.kernel), (1, *g.strides), (1, *g.dilations), (0, g.pads[0], 0, g.pads[1]), g.group
    )


def _as_2d(x: np.ndarray) -> np.ndarray:
    return x[:, :, None, :] if x.ndim == 3 else x


def _positions(
    rng, geo: ConvGeometry, in_size, out_size=None, count: int = POSITIONS
) -> tuple[np.ndarray, np.ndarray]:
    """Up to `count` output positions (row, col indices), all of them on small maps."""
    out_size = out_size or [geo.output_size(s, a) for a, s in enumerate(in_size)]
    total = out_size[0] * out_size[1]
    flat = np.arange(total) if total <= count else rng.choice(total, count, replace=False)
    return flat // out_size[1], flat % out_size[1]


def _patches(x: np.ndarray, geo: ConvGeometry, positions) -> np.ndarray:
    """(B*P, C, kH, kW): the input patch each sampled output position reads."""
    (top, left), (bottom, right) = geo.pads[:2], geo.pads[2:]
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    rows, cols = positions
    r = (
        rows[:, None, None] * geo.strides[0]
        + np.arange(geo.kernel[0])[None, :, None] * geo.dilations[0]
    )
    c = (
        cols[:, None, None] * geo.strides[1]
        + np.arange(geo.kernel[1])[None, None, :] * geo.dilations[1]
    )
    patches = padded[:, :, r, c]  # (B, C, P, kH, kW)
    return patches.transpose(0, 2, 1, 3, 4).reshape(-1, x.shape[1], *geo.kernel)
