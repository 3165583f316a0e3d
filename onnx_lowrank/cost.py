"""Multiply-adds and parameters, from the shapes each op really sees."""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx

from .graph import ConvGeometry


@dataclass(frozen=True)
class ConvShape:
    """The shape side of one Conv of a chain: weight shape, group and geometry."""

    weight_shape: tuple[int, ...]  # (out, in/group, *kernel)
    geometry: ConvGeometry

    @property
    def params(self) -> int:
        return math.prod(self.weight_shape)

    def output_spatial(self, spatial: list[int]) -> list[int]:
        return [self.geometry.output_size(s, a) for a, s in enumerate(spatial)]

    def macs(self, spatial_in: list[int]) -> int:
        """Multiply-adds for one sample with input spatial size `spatial_in`."""
        return self.params * math.prod(self.output_spatial(spatial_in))


def chain_macs(chain: list[ConvShape], spatial_in: list[int]) -> int:
    """Multiply-adds of a conv chain, propagating the spatial size stage by stage."""
    total, spatial = 0, list(spatial_in)
    for stage in chain:
        total += stage.macs(spatial)
        spatial = stage.output_spatial(spatial)
    return total


def matmul_macs(rows: int, inner: int, cols: int) -> int:
    return rows * inner * cols


def model_macs(model: onnx.ModelProto) -> int | None:
    """Per-sample multiply-adds of every Conv, Gemm and MatMul in a shape-inferred model.

    Unknown dims (a dynamic batch) count as 1; returns None when a Conv's output is unknown."""
    shapes = _value_shapes(model)
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    inits[node.output[0]] = list(a.t.dims)
    total = 0
    for node in model.graph.node:
        macs = _node_macs(node, shapes, inits)
        if macs is None:
            return None
        total += macs
    return total


def _node_macs(node, shapes, inits) -> int | None:
    if node.op_type == "Conv":
        w, out = inits.get(node.input[1]) or shapes.get(node.input[1]), shapes.get(node.output[0])
        if w is None or out is None:
            return None
        return math.prod(w) * math.prod(_known(out[2:]))
    if node.op_type in ("Gemm", "MatMul"):
        a = shapes.get(node.input[0]) or inits.get(node.input[0])
        out = shapes.get(node.output[0])
        if a is None or out is None or not a:
            return None
        attrs = {x.name: x.i for x in node.attribute}
        inner = a[0] if node.op_type == "Gemm" and attrs.get("transA", 0) else a[-1]
        return _known([inner])[0] * math.prod(_known(out))
    return 0


def _known(dims: list) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else 1 for d in dims]


def _value_shapes(model: onnx.ModelProto) -> dict[str, list]:
    out: dict[str, list] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return out
