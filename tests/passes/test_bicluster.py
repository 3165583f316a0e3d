"""Biclustered passes: exact at full ranks over random strides, dilations, pads, bias and kernel
shapes (hypothesis); structure, group choice, skips and the input-order handling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelgen import assert_same_outputs, attr, conv_model, geometry, ops

import onnx_lowrank as ol

EXAMPLES = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def bicluster_cases(draw):
    kernel, attrs, size = draw(geometry(min_kernel=2))
    g, h = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 4]))
    c, n = g * draw(st.integers(1, 3)), h * draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    weight = rng.standard_normal((n, c, *kernel)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if draw(st.booleans()) else None
    x = rng.standard_normal((draw(st.integers(1, 2)), c, *size)).astype(np.float32)
    return conv_model(weight, ["N", c, *size], attrs, bias), x, (g, h)


def _check_exact(method: str, case) -> None:
    model, x, groups = case
    out, report = ol.optimize(
        model, method=method, groups=groups, rank=10_000, force=True, check=0, rank_multiple=1
    )
    (record,) = report.records
    assert record.status == "rewritten" and record.fit_error < 1e-5, record
    assert f"G={groups[0]}, H={groups[1]}" in record.detail
    assert_same_outputs(model, out, {"x": x}, rtol=1e-3, atol=1e-4)


@EXAMPLES
@given(bicluster_cases())
def test_bicluster_svd_exact_at_full_rank(case):
    _check_exact("bicluster-svd", case)


@EXAMPLES
@given(bicluster_cases())
def test_bicluster_outer_exact_at_full_rank(case):
    _check_exact("bicluster-outer", case)


def _layer(c=8, n=8, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    return conv_model(w, [1, c, 10, 10], {"pads": [1, 1, 1, 1], "strides": [2, 1]}, b), rng


def test_bicluster_svd_structure():
    model, rng = _layer()
    out, report = ol.optimize(
        model, method="bicluster-svd", groups=(4, 2), ranks=(2, 3), check=0, force=True
    )
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert [attr(n, "group") for n in convs] == [4, 8, 2]
    assert "input order by Gather (x is a graph input)" in report.records[0].detail
    assert attr(convs[1], "strides") == [2, 1] and attr(convs[1], "pads") == [1, 1, 1, 1]
    assert attr(convs[0], "pads") == [0, 0, 0, 0] and len(convs[2].input) == 3
    assert report.records[0].rank == [2, 3]
    assert "Gather" in ops(out)  # the block order between stages 2 and 3


def test_bicluster_outer_middle_is_depthwise():
    model, _ = _layer()
    out, report = ol.optimize(
        model, method="bicluster-outer", groups=(2, 2), rank=3, check=0, force=True
    )
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert attr(convs[1], "group") == 2 * 2 * 3 and report.records[0].rank == 3


def test_groups_must_divide_the_channels():
    model, _ = _layer(c=6)
    _, report = ol.optimize(model, method="bicluster-svd", groups=(4, 2), rank=2, check=0)
    assert "must divide C=6" in report.records[0].reason


def test_one_by_one_and_grouped_convs_are_skipped():
    rng = np.random.default_rng(0)
    model = conv_model(rng.standard_normal((8, 8, 1, 1)).astype(np.float32), [1, 8, 4, 4])
    _, report = ol.optimize(model, method="bicluster-svd", rank=2, check=0)
    assert "1x1" in report.records[0].reason
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    model = conv_model(w, [1, 8, 6, 6], {"group": 2})
    _, report = ol.optimize(model, method="bicluster-outer", rank=2, check=0)
    assert "grouped" in report.records[0].reason


@pytest.mark.parametrize("method", ["bicluster-svd", "bicluster-outer"])
def test_speedup_chooses_groups_and_ranks_within_budget(method):
    model, _ = _layer(c=16, n=16)
    _, report = ol.optimize(model, method=method, speedup=2, check=0, rank_multiple=1)
    record = report.records[0]
    assert record.status == "rewritten" and record.macs_after * 2 <= record.macs_before
    assert "G=" in record.detail


def test_dense_block_sparse_first_conv_is_exact(monkeypatch):
    from onnx_lowrank.passes import bicluster

    monkeypatch.setattr(bicluster, "DENSE_MAX_GROUPS", 4)
    model, rng = _layer()
    out, report = ol.optimize(
        model, method="bicluster-svd", groups=(2, 2), rank=100, check=0, force=True
    )
    assert "dense block-sparse" in report.records[0].detail and ops(out)[0] == "Conv"
    assert_same_outputs(model, out, {"x": rng.standard_normal((1, 8, 10, 10)).astype(np.float32)})


def test_max_error_is_met_or_skipped():
    model, _ = _layer(c=8, n=16)
    _, report = ol.optimize(model, method="bicluster-svd", max_error=0.3, check=0, force=True)
    record = report.records[0]
    assert record.status == "skipped" or record.fit_error <= 0.3


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "bicluster-svd", "energy": 0.9}, "--energy has no meaning for bicluster"),
        ({"method": "bicluster-outer", "ranks": (2, 3)}, "one rank"),
        ({"method": "tucker2", "groups": (2, 2)}, "--groups applies"),
        ({"method": "bicluster-svd", "groups": (0, 2)}, "--groups must be"),
    ],
)
def test_bad_options_are_one_clear_error(options, message):
    model, _ = _layer()
    with pytest.raises(ol.LowRankError, match=message):
        ol.optimize(model, check=0, **options)
