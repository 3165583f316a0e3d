"""Every conv pass is exact at full rank in onnxruntime, over random attributes (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelgen import assert_same_outputs, attr, conv_model

import onnx_lowrank as ol


@st.composite
def conv_cases(draw, one_d: bool):
    """A Conv's shapes and attributes: strides, dilations, asymmetric pads or auto_pad, group,
    bias, batch, a dynamic batch dim, kH != kW."""
    nd = 1 if one_d else 2
    group = draw(st.sampled_from([1, 1, 1, 2, 3]))
    c = group * draw(st.integers(1, 4))
    n = group * draw(st.integers(1, 4))
    if group == c and c > 1:  # depthwise convs are skipped; see test_depthwise_is_skipped
        c *= 2
    kernel = [draw(st.integers(2, 5)) for _ in range(nd)]
    strides = [draw(st.integers(1, 3)) for _ in range(nd)]
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    # onnxruntime itself refuses dilations with SAME_* padding, so the reference could not run
    max_dilation = 1 if auto_pad.startswith("SAME") else 2
    dilations = [draw(st.integers(1, max_dilation)) for _ in range(nd)]
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    spatial = [s + draw(st.integers(0, 6)) for s in spans]
    attrs = {"strides": strides, "dilations": dilations, "group": group}
    if auto_pad == "NOTSET":
        if draw(st.booleans()):
            attrs["pads"] = [draw(st.integers(0, s - 1)) for s in spans * 2]
    else:
        attrs["auto_pad"] = auto_pad
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    batch = draw(st.integers(1, 3))
    dynamic = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n, c // group, *kernel)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if draw(st.booleans()) else None
    x = rng.standard_normal((batch, c, *spatial)).astype(np.float32)
    shape = ["N" if dynamic else batch, c, *spatial]
    return conv_model(weight, shape, attrs, bias), x


def _check_exact(method: str, case) -> None:
    model, x = case
    out, report = ol.optimize(
        model, method=method, rank=10_000, force=True, check=0, rank_multiple=1
    )
    (record,) = report.records
    assert record.status == "rewritten", record.reason
    assert record.fit_error < 1e-5
    assert_same_outputs(model, out, {"x": x})
    assert out.graph.output[0].name == "y" and out.graph.input[0].name == "x"


EXAMPLES = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))


@EXAMPLES
@given(conv_cases(one_d=False))
def test_separable_exact_at_full_rank(case):
    _check_exact("separable", case)


@EXAMPLES
@given(conv_cases(one_d=False))
def test_channel_svd_exact_at_full_rank(case):
    _check_exact("channel-svd", case)


@EXAMPLES
@given(conv_cases(one_d=False))
def test_tucker2_exact_at_full_rank(case):
    _check_exact("tucker2", case)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(conv_cases(one_d=True), st.sampled_from(["channel-svd", "tucker2"]))
def test_1d_convs_exact_at_full_rank(case, method):
    _check_exact(method, case)


def test_pointwise_conv_channel_svd_exact_and_tucker2_skips():
    rng = np.random.default_rng(3)
    model = conv_model(rng.standard_normal((12, 10, 1, 1)).astype(np.float32), [2, 10, 5, 5])
    out, report = ol.optimize(model, method="channel-svd", rank=100, force=True, check=0)
    assert report.records[0].status == "rewritten"
    assert_same_outputs(model, out, {"x": rng.standard_normal((2, 10, 5, 5)).astype(np.float32)})
    _, report = ol.optimize(model, method="tucker2", rank=100, force=True, check=0)
    assert "1x1 kernel" in report.records[0].reason


def _model(kernel=(3, 5), attrs=None, c=8, n=12, bias=True, group=1):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, c // group, *kernel)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    a = {
        "strides": [2, 1],
        "dilations": [1, 2],
        "pads": [1, 2, 0, 3],
        "group": group,
        **(attrs or {}),
    }
    return conv_model(w, [1, c, 16, 17], a, b)


def test_separable_structure():
    out, _ = ol.optimize(_model(), method="separable", rank=4, check=0, rank_multiple=1)
    vertical, horizontal = out.graph.node
    assert attr(vertical, "kernel_shape") == [3, 1] and attr(horizontal, "kernel_shape") == [1, 5]
    assert attr(vertical, "strides") == [2, 1] and attr(horizontal, "strides") == [1, 1]
    assert attr(vertical, "dilations") == [1, 1] and attr(horizontal, "dilations") == [1, 2]
    assert attr(vertical, "pads") == [1, 0, 0, 0] and attr(horizontal, "pads") == [0, 2, 0, 3]
    assert len(vertical.input) == 2 and horizontal.input[2] == "B"  # bias on the last conv
    assert horizontal.output[0] == "y"
    assert [t.name for t in out.graph.initializer] == ["B", "W/separable/0", "W/separable/1"] or {
        t.name for t in out.graph.initializer
    } == {"B", "W/separable/0", "W/separable/1"}
    assert vertical.name == "conv/separable/0"


def test_tucker2_structure_and_pads_on_core():
    out, report = ol.optimize(_model(), method="tucker2", ranks=(3, 5), check=0, rank_multiple=1)
    first, core, last = out.graph.node
    assert attr(first, "kernel_shape") == [1, 1] and attr(first, "pads") == [0, 0, 0, 0]
    assert attr(core, "pads") == [1, 2, 0, 3] and attr(core, "strides") == [2, 1]
    assert report.records[0].rank == [3, 5]
    w = {t.name: t for t in out.graph.initializer}
    assert list(w["W/tucker2/1"].dims) == [5, 3, 3, 5]


def test_channel_svd_grouped_keeps_group():
    out, report = ol.optimize(
        _model(group=2), method="channel-svd", rank=3, check=0, rank_multiple=1
    )
    spatial, pointwise = out.graph.node
    assert attr(spatial, "group") == 2 and attr(pointwise, "group") == 2
    assert report.records[0].rank == 3


@pytest.mark.parametrize("method", ["separable", "channel-svd", "tucker2"])
def test_depthwise_is_skipped(method):
    model = _model(c=8, n=8, group=8)
    _, report = ol.optimize(model, method=method, rank=2, check=0)
    assert report.records[0].status == "skipped" and "depthwise" in report.records[0].reason


def test_fp16_weights_stay_fp16():
    model = _model()
    for t in model.graph.initializer:
        t.CopyFrom(
            __import__("onnx").numpy_helper.from_array(
                __import__("onnx").numpy_helper.to_array(t).astype(np.float16), t.name
            )
        )
    model.graph.input[0].type.tensor_type.elem_type = 10
    out, _ = ol.optimize(model, method="separable", rank=4, check=0)
    assert {t.data_type for t in out.graph.initializer} == {10}
