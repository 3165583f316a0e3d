"""Any model a user has: Constant-node weights, external data, old IR/opsets, auto_pad, dynamic
shapes, metadata and untouched nodes kept, ops that are left alone, every input kind."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from modelgen import assert_same_outputs, attr, conv_model, ops
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank as ol
from onnx_lowrank.errors import LowRankError

RNG = np.random.default_rng(0)
W = RNG.standard_normal((16, 8, 3, 3)).astype(np.float32)
X = RNG.standard_normal((2, 8, 12, 12)).astype(np.float32)


def test_weights_in_constant_nodes_are_read_and_the_constant_removed():
    model = conv_model(W, ["N", 8, 12, 12], {"pads": [1, 1, 1, 1]}, weight_as_constant_node=True)
    out, report = ol.optimize(model, method="tucker2", rank=100, force=True, check=0)
    assert report.records[0].status == "rewritten"
    assert "Constant" not in ops(out)
    assert_same_outputs(model, out, {"x": X})


def test_metadata_opsets_io_and_untouched_nodes_are_kept():
    model = conv_model(W, ["N", 8, 12, 12], {"pads": [1, 1, 1, 1]})
    relu = helper.make_node("Relu", ["y"], ["z"], name="keep_me", doc_string="hello")
    model.graph.node.append(relu)
    model.graph.output[0].name = "z"
    model.metadata_props.add(key="author", value="someone")
    model.producer_name, model.doc_string, model.graph.name = "pytorch", "a model", "main"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    out, _ = ol.optimize(model, method="separable", rank=4, check=0)
    assert {p.key: p.value for p in out.metadata_props} == {"author": "someone"}
    assert (out.producer_name, out.doc_string, out.graph.name) == ("pytorch", "a model", "main")
    assert out.ir_version == model.ir_version and list(out.opset_import) == list(model.opset_import)
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == [
        "z"
    ]
    assert out.graph.node[-1] == relu


def test_ir4_initializers_listed_as_inputs():
    model = conv_model(W, [1, 8, 12, 12], {"pads": [1, 1, 1, 1]}, bias=np.ones(16, np.float32))
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    model.ir_version = 4
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 7))
    out, report = ol.optimize(model, method="channel-svd", rank=100, force=True, check=0)
    assert report.records[0].status == "rewritten"
    assert [i.name for i in out.graph.input] == ["x", "B"]  # the weight W is gone; the bias stays
    assert_same_outputs(model, out, {"x": X[:1]})


def test_old_ir_version_is_refused():
    model = conv_model(W, [1, 8, 12, 12])
    model.ir_version = 3
    with pytest.raises(LowRankError, match="IR version 3"):
        ol.optimize(model)


def test_external_data_read_and_written(tmp_path):
    model = conv_model(W, ["N", 8, 12, 12], {"pads": [1, 1, 1, 1]})
    src = tmp_path / "in.onnx"
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)  # save_model moves the weights of the proto it is given out to the file
    onnx.save_model(
        on_disk, src, save_as_external_data=True, location="in.onnx.data", size_threshold=0
    )
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    out_path = tmp_path / "out.onnx"
    result, _ = ol.optimize(str(src), method="separable", rank=100, force=True, output=out_path)
    assert isinstance(result, onnx.ModelProto)
    assert (tmp_path / "out.onnx.data").exists()
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert_same_outputs(model, onnx.load(out_path), {"x": X})
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".onnx-lowrank")]


def test_same_auto_pad_with_stride_needs_a_static_size():
    model = conv_model(W, ["N", 8, "H", "W"], {"auto_pad": "SAME_UPPER", "strides": [2, 2]})
    _, report = ol.optimize(model, method="separable", rank=100, force=True, check=0)
    assert report.records[0].status == "skipped" and "--input-shape" in report.records[0].reason
    out, report = ol.optimize(
        model,
        method="separable",
        rank=100,
        force=True,
        check=0,
        input_shapes={"x": ("N", 8, 11, 13)},
    )
    assert report.records[0].status == "rewritten"
    dims = out.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [8, 11, 13]
    x = RNG.standard_normal((3, 8, 11, 13)).astype(np.float32)
    assert_same_outputs(model, out, {"x": x})
    assert attr(out.graph.node[0], "auto_pad") is None


def test_input_shape_naming_no_input_is_an_error():
    with pytest.raises(LowRankError, match="not a model input"):
        ol.optimize(conv_model(W, [1, 8, 12, 12]), input_shapes={"nope": (1, 8, 12, 12)})


def test_ops_left_alone_are_recorded():
    w3 = RNG.standard_normal((4, 8, 3, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "W"], ["t"], name="up"),
        helper.make_node("Conv", ["v", "W3"], ["c3"], name="conv3d"),
        helper.make_node("Conv", ["x", "wdyn"], ["cd"], name="dynamic"),
    ]
    inits = [
        numpy_helper.from_array(W.transpose(1, 0, 2, 3).copy(), "W"),
        numpy_helper.from_array(w3, "W3"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 8, 6, 6, 6]),
        helper.make_tensor_value_info("wdyn", TensorProto.FLOAT, [16, 8, 3, 3]),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("t", "c3", "cd")]
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, inits),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    out, report = ol.optimize(model, method="tucker2", rank=2, check=0)
    reasons = {r.node: r.reason for r in report.records}
    assert all(r.status == "skipped" for r in report.records)
    assert "left as is" in reasons["up"] and "3-D" in reasons["conv3d"]
    assert "run time" in reasons["dynamic"]
    assert ops(out) == ops(model)


def test_graphsurgeon_graph_in_graph_out():
    graph = gs.import_onnx(conv_model(W, ["N", 8, 12, 12], {"pads": [1, 1, 1, 1]}))
    out, report = ol.optimize(graph, method="separable", rank=4, check=0)
    assert isinstance(out, gs.Graph) and [n.op for n in out.nodes] == ["Conv", "Conv"]


def test_shared_weight_gets_unique_names():
    model = conv_model(W, [1, 8, 12, 12], {"pads": [1, 1, 1, 1]})
    model.graph.node.append(
        helper.make_node("Conv", ["x", "W"], ["y2"], name="twin", pads=[1, 1, 1, 1])
    )
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, None))
    out, report = ol.optimize(model, method="separable", rank=100, force=True, check=0)
    names = [t.name for t in out.graph.initializer]
    assert len(names) == len(set(names)) == 4
    assert_same_outputs(model, out, {"x": X[:1]})


def test_report_records_and_validation():
    model = conv_model(W, ["N", 8, 12, 12], {"pads": [1, 1, 1, 1]})
    _, report = ol.optimize(model, method="separable", energy=0.5, check=3, tolerance=1e-9)
    data = report.to_dict()
    layer = data["layers"][0]
    assert set(layer) >= {
        "node",
        "op",
        "method",
        "rank",
        "macs_before",
        "macs_after",
        "params_before",
        "params_after",
        "fit_error",
        "status",
        "reason",
    }
    assert layer["macs_before"] == 16 * 8 * 9 * 12 * 12
    assert data["totals"]["macs_before"] == layer["macs_before"]
    assert data["totals"]["macs_after"] == layer["macs_after"]
    assert data["validation"]["samples"] == 3 and data["validation"]["passed"] is False
    assert data["config"]["rank"] == {"kind": "energy", "value": 0.5, "second": None}
