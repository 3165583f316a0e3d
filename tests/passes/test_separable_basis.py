"""Separable-basis pass (Jaderberg scheme 1): exact on kernels made of M separable filters per
input channel, over random strides, dilations, pads and bias; exact at M = kH*kW."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelgen import assert_same_outputs, attr, conv_model, geometry, ops

import onnx_lowrank as ol


def basis_kernel(rng, n, c, kh, kw, m):
    a = rng.standard_normal((n, c, m))
    v, h = rng.standard_normal((c, m, kh)), rng.standard_normal((c, m, kw))
    return np.einsum("ncm,cmy,cmx->ncyx", a, v, h).astype(np.float32)


@st.composite
def cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n, c, m = draw(st.integers(2, 6)), draw(st.integers(1, 4)), draw(st.integers(1, 2))
    (kh, kw), attrs, size = draw(geometry(min_kernel=2, min_width=2))
    bias = rng.standard_normal(n).astype(np.float32) if draw(st.booleans()) else None
    model = conv_model(basis_kernel(rng, n, c, kh, kw, m), ["N", c, *size], attrs, bias)
    return model, rng.standard_normal((2, c, *size)).astype(np.float32), m


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases())
def test_exact_on_basis_kernels(case):
    model, x, m = case
    out, report = ol.optimize(model, method="separable-basis", rank=m, force=True, check=0)
    assert report.records[0].status == "rewritten" and report.records[0].fit_error < 1e-5
    assert ops(out) == ["Conv"] * 3
    assert_same_outputs(model, out, {"x": x}, rtol=1e-3, atol=1e-4)


def test_exact_at_full_basis_and_structure():
    rng = np.random.default_rng(0)
    model = conv_model(
        rng.standard_normal((6, 3, 3, 2)).astype(np.float32),
        [1, 3, 9, 9],
        {"strides": [2, 1], "pads": [1, 0, 1, 1]},
        np.ones(6, np.float32),
    )
    out, report = ol.optimize(model, method="separable-basis", rank=100, force=True, check=0)
    assert report.records[0].rank == 6 and report.records[0].fit_error < 1e-5
    vertical, horizontal, mixing = out.graph.node
    assert attr(vertical, "group") == 3 and attr(vertical, "strides") == [2, 1]
    assert attr(horizontal, "group") == 18 and attr(horizontal, "pads") == [0, 0, 0, 1]
    assert len(mixing.input) == 3
    x = rng.standard_normal((1, 3, 9, 9)).astype(np.float32)
    assert_same_outputs(model, out, {"x": x}, rtol=1e-3, atol=1e-4)


def test_max_error_and_energy_refused():
    rng = np.random.default_rng(1)
    model = conv_model(basis_kernel(rng, 8, 4, 3, 3, 2), [1, 4, 8, 8])
    _, report = ol.optimize(model, method="separable-basis", max_error=0.01, check=0, force=True)
    assert report.records[0].rank <= 2 and report.records[0].fit_error <= 0.01
    with pytest.raises(ol.LowRankError, match="no meaning"):
        ol.optimize(model, method="separable-basis", energy=0.9)
