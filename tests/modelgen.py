"""Small ONNX models built in code, and running them in onnxruntime, for the tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper


def conv_model(
    weight: np.ndarray,
    input_shape: list,
    attrs: dict | None = None,
    bias: np.ndarray | None = None,
    opset: int = 13,
    weight_as_constant_node: bool = False,
) -> onnx.ModelProto:
    """x -> Conv(weight, bias, attrs) -> y; input dims may be strings (symbolic)."""
    nodes, inits = [], []
    if weight_as_constant_node:
        nodes.append(helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(weight)))
    else:
        inits.append(numpy_helper.from_array(weight, "W"))
    inputs = ["x", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "B"))
        inputs.append("B")
    nodes.append(helper.make_node("Conv", inputs, ["y"], name="conv", **(attrs or {})))
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(input_shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """Outputs with graph optimizations off, so what is compared is the graph as written."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    sess = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return sess.run(None, feeds)


def assert_same_outputs(
    a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict, rtol: float = 1e-4, atol: float = 1e-5
) -> None:
    """Outputs agree to float32 round-off (atol scaled by the output's magnitude)."""
    for out_a, out_b in zip(run(a, feeds), run(b, feeds), strict=True):
        assert out_a.shape == out_b.shape
        scale = max(1.0, float(np.abs(out_a).max()))
        np.testing.assert_allclose(out_b, out_a, rtol=rtol, atol=atol * scale)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


@st.composite
def geometry(draw, min_kernel: int = 1, min_width: int = 1):
    """Kernel (height >= min_kernel, width >= min_width), Conv attributes and an input size:
    strides, dilations, pads or auto_pad."""
    kernel = [draw(st.integers(min_kernel, 5)), draw(st.integers(min_width, 5))]
    strides = [draw(st.integers(1, 3)) for _ in range(2)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "NOTSET", "SAME_UPPER", "VALID"]))
    max_dilation = 1 if auto_pad.startswith("SAME") else 2
    dilations = [draw(st.integers(1, max_dilation)) for _ in range(2)]
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    size = [s + draw(st.integers(0, 5)) for s in spans]
    attrs = {"strides": strides, "dilations": dilations}
    if auto_pad == "NOTSET":
        attrs["pads"] = [draw(st.integers(0, s - 1)) for s in spans * 2]
    else:
        attrs["auto_pad"] = auto_pad
    return kernel, attrs, size
