"""Model I/O and graph facts: load/save (external data, atomic write), constant weights whether
held in initializers or Constant nodes, shape inference with pinned inputs, auto_pad -> pads."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from .errors import LowRankError

log = logging.getLogger(__name__)

MIN_IR_VERSION = 4
MIN_OPSET = 7
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = int(1.8 * 2**30)  # leave headroom under protobuf's 2 GB cap


@dataclass
class LoadedModel:
    """A model and where it came from: whether its weights lived in external data."""

    model: onnx.ModelProto
    external: bool = False


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Read and check an ONNX file; every failure is a one-sentence LowRankError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LowRankError(f"{path}: no such file")
    if os.path.isdir(path):
        raise LowRankError(f"{path}: is a directory, not an ONNX file")
    if not os.access(path, os.R_OK):
        raise LowRankError(f"{path}: permission denied")
    try:
        model = onnx.load(path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, UnicodeDecodeError) as exc:
        raise LowRankError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    external = any(_is_external(t) for t in _all_initializers(model.graph))
    if external:
        try:
            onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except (OSError, ValueError, RuntimeError) as exc:
            raise LowRankError(
                f"{path}: cannot read its external data ({_first_line(exc)})"
            ) from None
    check_model(model, path)
    return LoadedModel(model, external)


def check_model(model: onnx.ModelProto, where: str = "model") -> None:
    """Reject what is not an ONNX model at all, or is older than we support."""
    if model.ir_version == 0 or not model.HasField("graph") or not model.opset_import:
        raise LowRankError(f"{where}: not an ONNX model (no IR version, graph or opset)")
    if model.ir_version < MIN_IR_VERSION:
        raise LowRankError(f"{where}: IR version {model.ir_version} is older than the supported 4")
    opset = default_opset(model)
    if opset is not None and opset < MIN_OPSET:
        raise LowRankError(f"{where}: opset {opset} is older than the supported {MIN_OPSET}")
    if not model.graph.node:
        raise LowRankError(f"{where}: the graph has no nodes")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        # exporters write models the checker dislikes but onnxruntime runs: warn, go on
        log.warning("%s: onnx.checker: %s", where, _first_line(exc))


def default_opset(model: onnx.ModelProto) -> int | None:
    """The version of the default ('' or 'ai.onnx') operator set."""
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return None


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external: bool = False) -> None:
    """Write atomically: build the file(s) in a temporary folder beside `path`, then rename.

    Weights go to `<name>.data` beside the model when `external` is asked or when the model
    would pass protobuf's 2 GB limit."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise LowRankError(f"{path}: output folder {folder} does not exist")
    external = external or weight_bytes(model) > EXTERNAL_THRESHOLD
    data_name = os.path.basename(path) + ".data"
    tmp = tempfile.mkdtemp(prefix=".onnx-lowrank-", dir=folder)
    try:
        tmp_model = os.path.join(tmp, os.path.basename(path))
        if external:
            onnx.save_model(
                model,
                tmp_model,
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            if os.path.exists(os.path.join(tmp, data_name)):
                os.replace(os.path.join(tmp, data_name), os.path.join(folder, data_name))
        else:
            onnx.save_model(model, tmp_model)
        os.replace(tmp_model, path)
    except OSError as exc:
        raise LowRankError(f"{path}: cannot write ({_first_line(exc)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by initializers, external or not (what a file would need)."""
    total = 0
    for t in _all_initializers(model.graph):
        total += len(t.raw_data) if t.raw_data else _typed_size(t)
    return total


def parse_input_shapes(items: list[str] | None) -> dict[str, tuple[int | str, ...]]:
    """`name:1,3,224,224` strings -> {name: dims}; a non-number (N, ?, -1) keeps that dim free."""
    shapes: dict[str, tuple[int | str, ...]] = {}
    for item in items or []:
        name, sep, dims = item.rpartition(":")
        if not sep or not name or not dims:
            raise LowRankError(
                f"--input-shape {item!r}: expected name:d1,d2,... (e.g. x:1,3,224,224)"
            )
        parsed: list[int | str] = []
        for d in dims.split(","):
            d = d.strip()
            if d.isdigit() and int(d) > 0:
                parsed.append(int(d))
            elif d and not d.lstrip("-").isdigit() or d == "-1":
                parsed.append(d if d != "-1" else "?")
            else:
                raise LowRankError(
                    f"--input-shape {item!r}: dimension {d!r} is not a positive integer"
                )
        shapes[name] = tuple(parsed)
    return shapes


def pin_input_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int | str, ...]]) -> None:
    """Write pinned dims into the graph inputs in place; unknown names are an error."""
    inputs = {i.name: i for i in model.graph.input}
    for name, dims in shapes.items():
        if name not in inputs:
            known = ", ".join(real_inputs(model)) or "none"
            raise LowRankError(
                f"--input-shape names {name!r}, which is not a model input ({known})"
            )
        tensor_type = inputs[name].type.tensor_type
        old = tensor_type.shape.dim
        if len(old) and len(old) != len(dims):
            raise LowRankError(
                f"--input-shape {name}: rank {len(dims)} given, the input has {len(old)}"
            )
        tensor_type.shape.Clear()
        for i, d in enumerate(dims):
            dim = tensor_type.shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            elif i < len(old) and old[i].HasField("dim_param"):
                dim.dim_param = old[i].dim_param
            else:
                dim.dim_param = f"{name}_dim{i}"


def real_inputs(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that are not initializers (old IR versions list weights as inputs too)."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """The graphsurgeon graph of `model` with shapes inferred. An unnamed node takes its first
    output's name (unique in a valid graph), so plans, reports and the names of the chains put
    in its place always tell layers apart; untouched nodes keep their original (empty) name in
    the output model."""
    graph = gs.import_onnx(infer_shapes(model))
    for node in graph.nodes:
        if not node.name and node.outputs:
            node.name = node.outputs[0].name
    return graph


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference, tolerant: a model it cannot handle keeps the shapes it has."""
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as exc:
        log.warning("shape inference failed, continuing without it: %s", _first_line(exc))
    return model


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The tensor's value when it is fixed at export time: an initializer or a Constant node."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def static_dims(tensor: gs.Tensor) -> list[int | None] | None:
    """The tensor's shape with unknown dims as None, or None when even the rank is unknown."""
    shape = getattr(tensor, "shape", None)
    if shape is None:
        return None
    return [d if isinstance(d, int) and d >= 0 else None for d in shape]


@dataclass(frozen=True)
class ConvGeometry:
    """A Conv's attributes with auto_pad resolved: pads as (begins..., ends...)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]
    group: int

    def begin(self, axis: int) -> int:
        return self.pads[axis]

    def end(self, axis: int) -> int:
        return self.pads[axis + len(self.kernel)]

    def output_size(self, size: int, axis: int) -> int:
        """Output length along a spatial axis for an input length `size`."""
        span = (self.kernel[axis] - 1) * self.dilations[axis] + 1
        return (size + self.begin(axis) + self.end(axis) - span) // self.strides[axis] + 1


def conv_geometry(
    attrs: dict, kernel: tuple[int, ...], spatial_in: list[int | None] | None
) -> ConvGeometry:
    """Resolve a Conv node's attributes; raises LowRankError with the reason it cannot."""
    nd = len(kernel)
    strides = tuple(attrs.get("strides", [1] * nd))
    dilations = tuple(attrs.get("dilations", [1] * nd))
    group = int(attrs.get("group", 1))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if "kernel_shape" in attrs and tuple(attrs["kernel_shape"]) != kernel:
        raise LowRankError("kernel_shape attribute disagrees with the weight")
    if auto_pad in ("NOTSET", ""):
        pads = tuple(attrs.get("pads", [0] * (2 * nd)))
    elif auto_pad == "VALID":
        pads = (0,) * (2 * nd)
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(auto_pad, kernel, strides, dilations, spatial_in)
    else:
        raise LowRankError(f"unsupported auto_pad {auto_pad!r}")
    return ConvGeometry(kernel, strides, dilations, pads, group)


def _same_pads(mode, kernel, strides, dilations, spatial_in) -> tuple[int, ...]:
    begins, ends = [], []
    for axis, k in enumerate(kernel):
        span = (k - 1) * dilations[axis] + 1
        if strides[axis] == 1:
            total = span - 1  # independent of the input size
        else:
            size = spatial_in[axis] if spatial_in else None
            if size is None:
                raise LowRankError(
                    f"auto_pad {mode} with stride > 1 needs a static input size "
                    "(pin it with --input-shape)"
                )
            out = math.ceil(size / strides[axis])
            total = max((out - 1) * strides[axis] + span - size, 0)
        small, large = total // 2, total - total // 2
        begin, end = (small, large) if mode == "SAME_UPPER" else (large, small)
        begins.append(begin)
        ends.append(end)
    return tuple(begins + ends)


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_initializers(g)


def _is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _typed_size(t: onnx.TensorProto) -> int:
    count = int(np.prod(t.dims)) if t.dims else 1
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 4
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return count * itemsize
    return count * itemsize if t.raw_data or _has_typed_data(t) else 0


def _has_typed_data(t: onnx.TensorProto) -> bool:
    return bool(t.float_data or t.int32_data or t.int64_data or t.double_data or t.uint64_data)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
