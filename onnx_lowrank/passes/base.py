"""What every pass shares: find a layer's facts, choose its rank, splice a chain in its place.

A conv pass says three things: why it would skip a layer (`skip_reason`), the chain's op shapes
at a rank (`layout`) and the chain's weights from a decomposition (`decompose`). This module
turns that into a rank choice against the user's target, a rewrite and a LayerRecord."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from ..config import OptimizeConfig, RankSpec
from ..cost import ConvShape, chain_macs
from ..decompose.metrics import channel_roots, unwhiten_first, whiten_input_channels
from ..decompose.rank import rank_for_energy, rank_for_error
from ..decompose.svd import relative_error
from ..errors import LowRankError
from ..graph import ConvGeometry, constant_value, conv_geometry, static_dims
from ..report import LayerRecord

FLOAT_TYPES = (np.float16, np.float32, np.float64)
NOMINAL_SIZE = 32  # spatial size assumed for cost ratios when shape inference knows none


@dataclass
class ConvLayer:
    """A Conv node with its constant weight, bias, resolved geometry and known shapes."""

    node: gs.Node
    weight: np.ndarray
    bias: np.ndarray | None
    geometry: ConvGeometry
    spatial_in: list[int]
    shape_known: bool
    moments: list[np.ndarray] | None = None  # per group, second moment of whitening patches

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.geometry.group

    @property
    def group(self) -> int:
        return self.geometry.group

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.weight.shape[2:]

    @property
    def shape(self) -> ConvShape:
        return ConvShape(tuple(self.weight.shape), self.geometry)

    @property
    def macs(self) -> int:
        return self.shape.macs(self.spatial_in)


def read_conv(node: gs.Node) -> ConvLayer | str:
    """The layer's facts, or the reason it cannot be factored at all."""
    if len(node.inputs) < 2:
        return "Conv without a weight input"
    weight = constant_value(node.inputs[1])
    if weight is None:
        return "weight is computed at run time"
    if weight.dtype.type not in FLOAT_TYPES:
        return f"weight dtype {weight.dtype} is not a float type"
    if weight.ndim == 5:
        return "3-D conv is not supported"
    if weight.ndim not in (3, 4):
        return f"{weight.ndim - 2}-D conv is not supported"
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = constant_value(node.inputs[2])
        if bias is None:
            return "bias is computed at run time"
    dims = static_dims(node.inputs[0])
    spatial = dims[2:] if dims and len(dims) == weight.ndim else None
    try:
        geometry = conv_geometry(node.attrs, tuple(weight.shape[2:]), spatial)
    except LowRankError as exc:
        return str(exc)
    known = spatial is not None and all(s is not None for s in spatial)
    if not known:
        spatial = [
            max(NOMINAL_SIZE, 2 * (k - 1) * d + 2)
            for k, d in zip(weight.shape[2:], geometry.dilations)
        ]
    return ConvLayer(node, weight, bias, geometry, list(spatial), known)


def stage_geometry(
    nd: int, group: int = 1, axis: int | None = None, layer: ConvLayer | None = None
) -> ConvGeometry:
    """Geometry of a chain stage: a plain 1x1 (`layer` None), the layer's full geometry
    (`axis` None), or the layer's strides/dilations/pads along one spatial axis only."""
    ones, zeros = (1,) * nd, (0,) * (2 * nd)
    if layer is None:
        return ConvGeometry(ones, ones, ones, zeros, group)
    g = layer.geometry
    if axis is None:
        return ConvGeometry(g.kernel, g.strides, g.dilations, g.pads, group)

    def only(values, fill):
        return tuple(v if i == axis else fill for i, v in enumerate(values))

    pads = only(g.pads[:nd], 0) + only(g.pads[nd:], 0)
    return ConvGeometry(only(g.kernel, 1), only(g.strides, 1), only(g.dilations, 1), pads, group)


class RankedPass:
    """Rank choice shared by every pass: a pass gives its full rank, its spectra and the MACs
    of its chain at a rank; `layer` only needs a `macs` attribute here."""

    method = ""
    two_ranks = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed  # for fits with random starts (CP, clustering); SVDs ignore it

    def full_rank(self, layer) -> tuple[int, ...]:
        raise NotImplementedError

    def spectra(self, layer) -> list[list[np.ndarray]]:
        """Per rank slot, the spectra (one per group) that energy/error targets read."""
        raise NotImplementedError

    def chain_macs(self, layer, rank: tuple[int, ...]) -> int:
        raise NotImplementedError

    @classmethod
    def plan_settings(cls, rank: tuple[int, ...]) -> dict:
        """The config fields under which this pass builds exactly the chain a plan names by
        `rank` (its rank slots here; the clustered passes add their groups or colours)."""
        second = rank[1] if len(rank) > 1 else None
        return {"rank": RankSpec("rank", rank[0], second), "colors": None, "groups": None}

    def choose_rank(self, layer, spec: RankSpec, multiple: int) -> tuple[int, ...]:
        """The rank (one per slot) meeting the user's target, rounded as the config says."""
        full = self.full_rank(layer)
        if spec.kind == "rank":
            second = spec.second if spec.second is not None else int(spec.value)
            wanted = (int(spec.value), second) if self.two_ranks else (int(spec.value),)
            return tuple(min(w, f) for w, f in zip(wanted, full))
        if spec.kind == "speedup":
            return self.rank_for_speedup(layer, spec.value, multiple)
        pick = rank_for_energy if spec.kind == "energy" else rank_for_error
        value = spec.value if spec.kind == "energy" else spec.value / math.sqrt(len(full))
        ranks = [max(pick(s, value) for s in slot) for slot in self.spectra(layer)]
        return tuple(min(_round_up(r, multiple), f) for r, f in zip(ranks, full))

    def rank_for_speedup(self, layer, speedup: float, multiple: int) -> tuple[int, ...]:
        """Largest rank whose chain costs at most 1/speedup of the layer's MACs."""
        full = self.full_rank(layer)
        budget = layer.macs / speedup
        steps = max(full)

        def at(step: int) -> tuple[int, ...]:
            return tuple(max(1, round(f * step / steps)) for f in full)

        lo, hi = 1, steps  # the largest step whose MACs fit (binary search, MACs grow with rank)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.chain_macs(layer, at(mid)) <= budget else (lo, mid - 1)
        ranks = at(lo)
        rounded = tuple(max(r - r % multiple, r if r < multiple else 0) for r in ranks)
        return rounded if self.chain_macs(layer, rounded) <= budget else ranks


class ConvPass(RankedPass):
    """Base of the conv passes; subclasses set `method` and the hooks below."""

    def skip_reason(self, layer: ConvLayer) -> str | None:
        """Why this method cannot apply to the layer (None when it can)."""
        if layer.group > 1 and layer.group == layer.in_channels:
            return "depthwise conv: no low-rank form pays"
        return None

    # the chain opens with a 1x1 conv over the input channels (tucker2, cp): whitening weighs
    # the input channels by their second moment and the pass factors the whitened weight
    pointwise_first = False

    def whitening(self, layer: ConvLayer) -> ConvGeometry | None:
        """The patches whose second moment a data-aware fit weighs the error with (None: this
        method fits the weights alone and relies on the least-squares refit)."""
        return stage_geometry(len(layer.kernel), layer.group) if self.pointwise_first else None

    def metric_weight(self, layer: ConvLayer) -> np.ndarray:
        """The weight a pointwise-first pass factors: W S^(1/2), with S the second moment of the
        input channels in `layer.moments`; the weight itself without moments."""
        if layer.moments is None or not self.pointwise_first:
            return layer.weight
        return whiten_input_channels(layer.weight, channel_roots(layer.moments), layer.group)

    def factor(self, layer: ConvLayer, rank: tuple[int, ...]):
        """`decompose` in the data's metric (Denton eq. 3) when `layer.moments` is set: a
        pointwise-first pass factors W S^(1/2) and its first conv takes S^(-1/2) back, so the
        chain computes W's approximation on raw inputs; other passes whiten inside decompose."""
        if layer.moments is None or not self.pointwise_first:
            return self.decompose(layer, rank)
        roots = channel_roots(layer.moments)
        whitened = replace(
            layer, weight=whiten_input_channels(layer.weight, roots, layer.group), moments=None
        )
        factors = self.decompose(whitened, rank)
        factors = replace(factors, first=unwhiten_first(factors.first, roots, layer.group))
        if hasattr(factors, "relative_error"):  # cp keeps its chain's error: against W itself
            factors = replace(
                factors, relative_error=relative_error(factors.reconstruct(), layer.weight)
            )
        return factors

    def layout(self, layer: ConvLayer, rank: tuple[int, ...]) -> list[ConvShape]:
        """The chain's Conv shapes at `rank`, in order (weights not needed)."""
        raise NotImplementedError

    def decompose(self, layer: ConvLayer, rank: tuple[int, ...]):
        """The factors (a decompose/ dataclass with reconstruct()) at `rank`."""
        raise NotImplementedError

    def weights(self, factors) -> list[np.ndarray]:
        """The chain's Conv weights from the factors, in the order of `layout`."""
        raise NotImplementedError

    def chain_macs(self, layer: ConvLayer, rank: tuple[int, ...]) -> int:
        return chain_macs(self.layout(layer, rank), layer.spatial_in)

    def rewrite(self, graph: gs.Graph, layer: ConvLayer, config: OptimizeConfig) -> LayerRecord:
        """Choose the rank, decompose, splice the chain in, and say what was done."""
        record = new_record(layer, self.method)
        record.reason = self.skip_reason(layer)
        if record.reason:
            return record
        rank = self.choose_rank(layer, config.target(self.method), config.rank_multiple)
        record.rank = list(rank) if self.two_ranks else rank[0]
        layout = self.layout(layer, rank)
        record.macs_after = chain_macs(layout, layer.spatial_in)
        record.params_after = sum(s.params for s in layout)
        if record.macs_after >= record.macs_before and not config.force:
            record.reason = (
                f"no gain: the chain at rank {_rank_text(rank)} costs "
                f"{record.macs_after / record.macs_before:.2f}x the layer's MACs"
            )
            return record
        factors = self.factor(layer, rank)
        record.fit_error = relative_error(factors.reconstruct(), layer.weight)
        spec = config.target(self.method)
        if spec.kind == "error" and record.fit_error > spec.value * (1 + 1e-6):
            record.reason = (
                f"best fit found has weight error {record.fit_error:.4f} > {spec.value:g}"
            )
            return record
        splice_conv_chain(graph, layer, layout, self.weights(factors), self.method)
        record.status, record.reason = "rewritten", None
        return record


def new_record(layer: ConvLayer, method: str) -> LayerRecord:
    """A conv layer's record before anything is decided (status 'skipped', no reason yet)."""
    return LayerRecord(
        node=layer.node.name,
        op="Conv",
        method=method,
        status="skipped",
        weight_shape=list(layer.weight.shape),
        macs_before=layer.macs,
        params_before=int(layer.weight.size),
        shape_known=layer.shape_known,
    )


def splice_conv_chain(
    graph: gs.Graph,
    layer: ConvLayer,
    layout: list[ConvShape],
    weights: list[np.ndarray],
    method: str,
) -> None:
    """Replace the layer's node by one Conv per stage; the last keeps the outputs and bias."""
    node = layer.node
    base = node.name or node.outputs[0].name
    shared = len(node.inputs[1].outputs) > 1  # another node reads the weight: name after the node
    weight_name = f"{base}.weight" if shared else node.inputs[1].name
    dtype = layer.weight.dtype
    current = node.inputs[0]
    for i, (shape, weight) in enumerate(zip(layout, weights)):
        if tuple(weight.shape) != shape.weight_shape:
            raise AssertionError(
                f"{method}: stage {i} weight {weight.shape} != {shape.weight_shape}"
            )
        last = i == len(layout) - 1
        inputs = [
            current,
            gs.Constant(f"{weight_name}/{method}/{i}", np.ascontiguousarray(weight, dtype)),
        ]
        if last and layer.bias is not None:
            inputs.append(node.inputs[2])
        outputs = (
            list(node.outputs) if last else [gs.Variable(f"{base}/{method}/{i}_out", dtype=dtype)]
        )
        g = shape.geometry
        attrs = {
            "kernel_shape": list(g.kernel),
            "strides": list(g.strides),
            "dilations": list(g.dilations),
            "pads": list(g.pads),
            "group": g.group,
        }
        add_node(graph, node, gs.Node("Conv", f"{base}/{method}/{i}", attrs, inputs, outputs))
        current = outputs[0]
    remove_node(graph, node)


def add_node(graph: gs.Graph, anchor: gs.Node, node: gs.Node) -> gs.Node:
    """Append a new node, placed in the output model where `anchor` was (or right after it)."""
    node.anchor = getattr(anchor, "origin", None)
    graph.nodes.append(node)
    return node


def remove_node(graph: gs.Graph, node: gs.Node) -> None:
    """Detach a node; a Constant node that fed only it goes too."""
    producers = [
        t.inputs[0] for t in node.inputs if len(t.inputs) == 1 and t.inputs[0].op == "Constant"
    ]
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)
    for producer in producers:
        if (
            producer in graph.nodes
            and not any(out.outputs for out in producer.outputs)
            and not any(out in graph.outputs for out in producer.outputs)
        ):
            producer.outputs.clear()
            graph.nodes.remove(producer)


def _round_up(rank: int, multiple: int) -> int:
    return -(-rank // multiple) * multiple


def _rank_text(rank: tuple[int, ...]) -> str:
    return ",".join(map(str, rank))
