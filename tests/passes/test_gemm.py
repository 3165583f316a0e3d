"""fc-svd: Gemm (transA, transB, alpha, beta, bias) and MatMul with a constant weight."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelgen import assert_same_outputs, ops
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank as ol


@st.composite
def gemm_cases(draw):
    k, m, rows = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 4))
    trans_a, trans_b = draw(st.booleans()), draw(st.booleans())
    alpha, beta = draw(st.sampled_from([1.0, 0.5, -2.0])), draw(st.sampled_from([1.0, 0.25]))
    bias = draw(st.sampled_from(["none", "vector", "row", "scalar"]))
    opset = draw(st.sampled_from([9, 11, 13]))
    if opset < 11 and bias == "none":
        bias = "vector"  # C is required before opset 11
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    b = rng.standard_normal((m, k) if trans_b else (k, m)).astype(np.float32)
    inits, inputs = [numpy_helper.from_array(b, "B")], ["a", "B"]
    if bias != "none":
        shape = {"vector": (m,), "row": (1, m), "scalar": ()}[bias]
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "C"))
        inputs.append("C")
    node = helper.make_node(
        "Gemm",
        inputs,
        ["y"],
        name="fc",
        alpha=alpha,
        beta=beta,
        transA=int(trans_a),
        transB=int(trans_b),
    )
    a_shape = [k, "N"] if trans_a else ["N", k]
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, m])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    a = rng.standard_normal((k, rows) if trans_a else (rows, k)).astype(np.float32)
    return model, {"a": a}


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(gemm_cases())
def test_gemm_exact_at_full_rank(case):
    model, feeds = case
    out, report = ol.optimize(model, method="fc-svd", rank=100, force=True, check=0)
    assert report.records[0].status == "rewritten"
    assert ops(out) == ["Gemm", "Gemm"]
    assert_same_outputs(model, out, feeds)


def _matmul_model(weight_first: bool, a_shape, w):
    inputs = ["W", "x"] if weight_first else ["x", "W"]
    node = helper.make_node("MatMul", inputs, ["y"], name="mm")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, a_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.integers(1, 10),
    st.integers(1, 10),
    st.lists(st.integers(1, 3), max_size=2),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_matmul_exact_at_full_rank(k, m, batch, weight_first, seed):
    rng = np.random.default_rng(seed)
    if weight_first:  # W (m, k) @ x (..., k, p)
        w, x = rng.standard_normal((m, k)), rng.standard_normal((*batch, k, 3))
    else:  # x (..., k) @ W (k, m)
        w, x = rng.standard_normal((k, m)), rng.standard_normal((*batch, 2, k))
    model = _matmul_model(weight_first, list(x.shape), w.astype(np.float32))
    out, report = ol.optimize(model, method="fc-svd", rank=100, force=True, check=0)
    assert report.records[0].status == "rewritten"
    assert ops(out) == ["MatMul", "MatMul"]
    assert_same_outputs(model, out, {"x": x.astype(np.float32)})


def test_matmul_low_rank_is_the_best_truncation():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    model = _matmul_model(False, ["N", 64], w)
    out, report = ol.optimize(model, method="fc-svd", rank=8, check=0)
    s = np.linalg.svd(w, compute_uv=False)
    expected = np.sqrt((s[8:] ** 2).sum() / (s**2).sum())
    assert abs(report.records[0].fit_error - expected) < 1e-5
    assert report.records[0].macs_after == 8 * (64 + 48)


def test_dynamic_matmul_is_skipped_with_reason():
    node = helper.make_node("MatMul", ["x", "z"], ["y"], name="attn")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4]) for n in "xz"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    _, report = ol.optimize(model, method="fc-svd", rank=2, check=0)
    assert report.records[0].status == "skipped" and "run time" in report.records[0].reason


def test_no_fc_leaves_gemm_alone():
    rng = np.random.default_rng(0)
    model = _matmul_model(False, [1, 32], rng.standard_normal((32, 32)).astype(np.float32))
    out, report = ol.optimize(model, method="separable", rank=2, fc=False, check=0)
    assert ops(out) == ["MatMul"] and report.records == []
