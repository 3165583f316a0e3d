"""Channel-order folding around clustered chains: each graph is rewritten and compared with the
original in onnxruntime; the record's detail says whether the order was folded or gathered."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from modelgen import assert_same_outputs, ops
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank as ol
from onnx_lowrank.passes.permute import plan_readers

RNG = np.random.default_rng(0)


def colour_weight(n=8, c=3, k=3, colors=2):
    """Filters of `colors` colour lines, shuffled, so the cluster order is not the identity."""
    lines = np.linalg.qr(RNG.standard_normal((c, c)))[0][:colors]
    labels = RNG.permutation(np.repeat(np.arange(colors), n // colors))
    return np.einsum("nc,nyx->ncyx", lines[labels], RNG.standard_normal((n, k, k))).astype(
        np.float32
    )


def build(nodes, weights, outputs=("y",), c=3, size=10) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, size, size])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def conv(name, x, w, y, bias=None, **attrs):
    inputs = [x, w] + ([bias] if bias else [])
    return helper.make_node("Conv", inputs, [y], name=name, pads=[1, 1, 1, 1], **attrs)


def rewrite(model, **options):
    out, report = ol.optimize(model, check=0, **options)  # convs with C > 4 are left alone
    x = RNG.standard_normal((1, 3, 10, 10)).astype(np.float32)
    assert_same_outputs(model, out, {"x": x}, rtol=1e-3, atol=1e-4)
    return out, report.records[0]


def test_folds_through_batchnorm_relu_into_the_next_conv():
    nodes = [
        conv("conv1", "x", "w1", "a", "b1"),
        helper.make_node("BatchNormalization", ["a", "s", "o", "m", "v"], ["b"], name="bn1"),
        helper.make_node("Relu", ["b"], ["r"], name="relu1"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool1", kernel_shape=[2, 2]),
        conv("conv2", "p", "w2", "y"),
    ]
    weights = {
        "w1": colour_weight(),
        "b1": RNG.standard_normal(8),
        "w2": RNG.standard_normal((4, 8, 3, 3)),
    }
    weights.update(
        s=RNG.random(8) + 0.5,
        o=RNG.standard_normal(8),
        m=RNG.standard_normal(8),
        v=RNG.random(8) + 0.5,
    )
    out, record = rewrite(build(nodes, weights), method="monochromatic", colors=2)
    assert record.detail.endswith("output order folded into bn1, conv2"), record.detail
    assert "Gather" not in ops(out)
    names = {t.name for t in out.graph.initializer}
    assert {"w2/perm", "s/perm", "v/perm"} <= names and "w2" not in names


def test_folds_per_channel_constants_and_clip():
    nodes = [
        conv("conv1", "x", "w1", "a"),
        helper.make_node("Mul", ["a", "scale"], ["b"], name="mul1"),
        helper.make_node("Add", ["half", "b"], ["c"], name="add1"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["d"], name="clip1"),
        conv("conv2", "d", "w2", "y"),
    ]
    weights = {
        "w1": colour_weight(),
        "scale": RNG.standard_normal((1, 8, 1, 1)),
        "half": 0.5,
        "lo": 0.0,
        "hi": 6.0,
        "w2": RNG.standard_normal((4, 8, 3, 3)),
    }
    out, record = rewrite(build(nodes, weights), method="monochromatic", colors=2)
    assert record.detail.endswith("output order folded into mul1, conv2"), record.detail
    assert "Gather" not in ops(out)


def test_residual_add_gets_a_gather():
    nodes = [
        conv("conv1", "x", "w1", "a"),
        conv("side", "x", "w2", "b"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add1"),
    ]
    weights = {"w1": colour_weight(), "w2": colour_weight()}
    out, record = rewrite(build(nodes, weights), method="monochromatic", colors=2)
    assert "output order restored by Gather (add1 (Add) adds a computed tensor" in record.detail
    assert ops(out).count("Gather") == 2  # one per side of the Add


def test_graph_output_gets_a_gather_and_keeps_its_name():
    nodes = [conv("conv1", "x", "w1", "a"), conv("conv2", "a", "w2", "y")]
    weights = {"w1": colour_weight(), "w2": RNG.standard_normal((4, 8, 3, 3))}
    out, record = rewrite(
        build(nodes, weights, outputs=("a", "y")), method="monochromatic", colors=2
    )
    assert "output order restored by Gather (a is a graph output)" in record.detail
    gather = next(n for n in out.graph.node if n.op_type == "Gather")
    assert gather.output[0] == "a" and [o.name for o in out.graph.output] == ["a", "y"]


def test_grouped_reader_folds_only_a_permutation_inside_its_groups():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        conv("conv2", "a", "w2", "y", group=2),
    ]
    model = build(nodes, {"w2": RNG.standard_normal((4, 4, 3, 3))}, c=8)
    graph = gs.import_onnx(model)
    relu_out = graph.tensors()["a"]
    inside = np.array([1, 0, 3, 2, 7, 6, 5, 4])
    fold = plan_readers(graph, relu_out, inside)
    assert not isinstance(fold, str) and fold.nodes == ["conv2"]
    _, _, weight = fold.edits[0]
    original = graph.nodes[1].inputs[1].values
    # output n of group q reads channel q*4 + j as local input inside[q*4 + j] - q*4
    np.testing.assert_array_equal(weight[0, :, :, :], original[0, [1, 0, 3, 2]])
    np.testing.assert_array_equal(weight[3, :, :, :], original[3, [3, 2, 1, 0]])
    mixing = np.array([4, 1, 2, 3, 0, 5, 6, 7])
    assert "would mix its groups" in plan_readers(graph, relu_out, mixing)


def test_bicluster_input_order_folds_into_the_producer():
    nodes = [
        conv("conv0", "x", "w0", "a", "b0"),
        helper.make_node("BatchNormalization", ["a", "s", "o", "m", "v"], ["b"], name="bn0"),
        helper.make_node("Relu", ["b"], ["r"], name="relu0"),
        conv("conv1", "r", "w1", "y", "b1"),
    ]
    weights = {
        "w0": RNG.standard_normal((8, 3, 3, 3)),
        "b0": RNG.standard_normal(8),
        "w1": RNG.standard_normal((8, 8, 3, 3)),
        "b1": RNG.standard_normal(8),
        "s": RNG.random(8) + 0.5,
        "o": RNG.standard_normal(8),
        "m": RNG.standard_normal(8),
        "v": RNG.random(8) + 0.5,
    }
    model = build(nodes, weights)
    out, report = ol.optimize(
        model, method="bicluster-svd", groups=(2, 2), rank=100, check=0, force=True
    )
    record = next(r for r in report.records if r.node == "conv1")
    assert "input order folded into bn0, conv0" in record.detail, record.detail
    x = RNG.standard_normal((1, 3, 10, 10)).astype(np.float32)
    assert_same_outputs(model, out, {"x": x}, rtol=1e-3, atol=1e-4)


def test_two_biclustered_layers_in_a_row():
    nodes = [
        conv("conv1", "x", "w1", "a"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        conv("conv2", "r", "w2", "y"),
    ]
    weights = {"w1": RNG.standard_normal((8, 4, 3, 3)), "w2": RNG.standard_normal((8, 8, 3, 3))}
    model = build(nodes, weights, c=4)
    out, report = ol.optimize(
        model, method="bicluster-svd", groups=(2, 2), rank=100, check=0, force=True
    )
    assert all(r.status == "rewritten" for r in report.records)
    x = RNG.standard_normal((1, 4, 10, 10)).astype(np.float32)
    assert_same_outputs(model, out, {"x": x}, rtol=1e-3, atol=1e-4)
