"""CP pass: a kernel made of R rank-1 terms is rewritten exactly at rank R, over random
strides, dilations, pads and bias; targets and skips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelgen import assert_same_outputs, attr, conv_model, geometry, ops

import onnx_lowrank as ol


def cp_kernel(rng, n, c, kh, kw, r):
    t, s = rng.standard_normal((n, r)), rng.standard_normal((c, r))
    y, x = rng.standard_normal((kh, r)), rng.standard_normal((kw, r))
    return np.einsum("nr,cr,yr,xr->ncyx", t, s, y, x).astype(np.float32)


@st.composite
def cp_cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n, c, r = draw(st.integers(2, 8)), draw(st.integers(2, 8)), draw(st.integers(1, 3))
    (kh, kw), attrs, size = draw(geometry(min_kernel=2, min_width=2))
    bias = rng.standard_normal(n).astype(np.float32) if draw(st.booleans()) else None
    model = conv_model(cp_kernel(rng, n, c, kh, kw, r), ["N", c, *size], attrs, bias)
    x = rng.standard_normal((draw(st.integers(1, 2)), c, *size)).astype(np.float32)
    return model, x, r


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(cp_cases())
def test_cp_chain_exact_on_cp_kernels(case):
    model, x, r = case
    out, report = ol.optimize(model, method="cp", rank=r, force=True, check=0, rank_multiple=1)
    record = report.records[0]
    assert record.status == "rewritten" and record.fit_error < 1e-5, record
    assert ops(out) == ["Conv"] * 4
    assert_same_outputs(model, out, {"x": x}, rtol=1e-3, atol=1e-4)


def test_cp_structure():
    rng = np.random.default_rng(0)
    model = conv_model(
        cp_kernel(rng, 16, 8, 3, 5, 4),
        [1, 8, 12, 12],
        {"strides": [2, 1], "pads": [1, 2, 0, 2]},
        np.ones(16, np.float32),
    )
    out, _ = ol.optimize(model, method="cp", rank=4, check=0, rank_multiple=1)
    first, vertical, horizontal, last = out.graph.node
    assert attr(first, "kernel_shape") == [1, 1] and attr(first, "pads") == [0, 0, 0, 0]
    assert attr(vertical, "group") == 4 and attr(vertical, "strides") == [2, 1]
    assert attr(vertical, "pads") == [1, 0, 0, 0] and attr(horizontal, "pads") == [0, 2, 0, 2]
    assert attr(horizontal, "group") == 4 and len(last.input) == 3


def test_cp_max_error_is_met_or_skipped():
    rng = np.random.default_rng(1)
    w = cp_kernel(rng, 24, 16, 3, 3, 12) + 0.01 * rng.standard_normal((24, 16, 3, 3)).astype(
        np.float32
    )
    model = conv_model(w, [1, 16, 10, 10], {"pads": [1, 1, 1, 1]})
    _, report = ol.optimize(model, method="cp", max_error=0.05, check=0)
    record = report.records[0]
    assert record.status == "rewritten" and record.fit_error <= 0.05


def test_cp_is_deterministic_under_a_seed():
    rng = np.random.default_rng(2)
    model = conv_model(rng.standard_normal((12, 6, 3, 3)).astype(np.float32), [1, 6, 8, 8])
    a, _ = ol.optimize(model, method="cp", rank=5, seed=3, check=0, force=True)
    b, _ = ol.optimize(model, method="cp", rank=5, seed=3, check=0, force=True)
    assert a.SerializeToString() == b.SerializeToString()


@pytest.mark.parametrize("group", [2])
def test_cp_skips_grouped_convs(group):
    rng = np.random.default_rng(0)
    model = conv_model(
        rng.standard_normal((8, 4, 3, 3)).astype(np.float32), [1, 8, 8, 8], {"group": group}
    )
    _, report = ol.optimize(model, method="cp", rank=2, check=0)
    assert "grouped" in report.records[0].reason


def test_energy_is_refused_for_cp():
    rng = np.random.default_rng(0)
    model = conv_model(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), [1, 4, 8, 8])
    with pytest.raises(ol.LowRankError, match="no meaning"):
        ol.optimize(model, method="cp", energy=0.9)
