"""Biclustered SVD / outer-product factorizations: exactness, monotonicity, ONNX stage layout."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_lowrank.decompose.bicluster import bicluster_outer, bicluster_svd

FAST = settings(max_examples=30, deadline=None)


def conv2d(x, weight, group=1, stride=1, dilation=1, pad=0):
    """ONNX Conv semantics in numpy: output group j reads only input group j."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    batch, channels, height, width = x.shape
    out_ch, per_group, kh, kw = weight.shape
    assert channels == per_group * group and out_ch % group == 0
    oh = (height - dilation * (kh - 1) - 1) // stride + 1
    ow = (width - dilation * (kw - 1) - 1) // stride + 1
    xg = x.reshape(batch, group, per_group, height, width)
    wg = weight.reshape(group, out_ch // group, per_group, kh, kw)
    out = np.zeros((batch, group, out_ch // group, oh, ow))
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dilation, i * dilation + stride * (oh - 1) + 1, stride)
            cols = slice(j * dilation, j * dilation + stride * (ow - 1) + 1, stride)
            out += np.einsum("bgcyx,goc->bgoyx", xg[:, :, :, rows, cols], wg[..., i, j])
    return out.reshape(batch, out_ch, oh, ow)


def run_stages(x, stages, **spatial_attrs):
    """Run a Stage chain as ONNX would; only the spatial conv gets strides/dilations/pads."""
    for stage in stages:
        if stage.kind == "gather":
            x = x[:, stage.indices]
            continue
        x = conv2d(x, stage.weight, stage.group, **(spatial_attrs if stage.spatial else {}))
        if stage.bias is not None:
            x = x + stage.bias[None, :, None, None]
    return x


@st.composite
def layers(draw):
    g, h = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    c, n = g * draw(st.integers(1, 4)), h * draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    weight = np.random.default_rng(seed).normal(size=(n, c, kh, kw)).astype(np.float32)
    return weight, (g, h)


def _full_ranks(weight, groups):
    n, c = weight.shape[:2]
    return c // groups[0], n // groups[1]


@FAST
@given(layers())
def test_svd_exact_at_full_ranks(layer):
    weight, groups = layer
    fit = bicluster_svd(weight, groups, _full_ranks(weight, groups))
    assert fit.relative_error < 1e-5
    np.testing.assert_allclose(fit.reconstruct(), weight, rtol=1e-4, atol=1e-5)


@FAST
@given(layers())
def test_outer_exact_at_full_rank(layer):
    weight, groups = layer
    fit = bicluster_outer(weight, groups, rank=10**6)
    assert fit.relative_error < 1e-5
    np.testing.assert_allclose(fit.reconstruct(), weight, rtol=1e-4, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(0, 2**16))
def test_outer_recovers_low_cp_rank_kernel(rank, seed):
    rng = np.random.default_rng(seed)
    a, b, c = rng.normal(size=(6, rank)), rng.normal(size=(9, rank)), rng.normal(size=(8, rank))
    weight = np.einsum("pk,tk,qk->qpt", a, b, c).reshape(8, 6, 3, 3)
    fit = bicluster_outer(weight, (1, 1), rank=rank, refine_iters=500)
    assert fit.relative_error < 1e-4


def test_outer_rank_one_blocks_are_exact_without_refinement():
    rng = np.random.default_rng(3)
    a, b, c = rng.normal(size=5), rng.normal(size=4), rng.normal(size=7)
    weight = np.einsum("p,t,q->qpt", a, b, c).reshape(7, 5, 2, 2)
    assert bicluster_outer(weight, (1, 1), rank=1, refine_iters=0).relative_error < 1e-6


@settings(max_examples=15, deadline=None)
@given(layers())
def test_svd_error_non_increasing_in_ranks(layer):
    weight, groups = layer
    k1_full, k2_full = _full_ranks(weight, groups)
    errors = [
        bicluster_svd(weight, groups, (min(k, k1_full), min(k, k2_full))).relative_error
        for k in range(1, max(k1_full, k2_full) + 1)
    ]
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:], strict=False))


@settings(max_examples=15, deadline=None)
@given(layers(), st.sampled_from([0, 50]))
def test_outer_error_non_increasing_in_rank(layer, refine_iters):
    weight, groups = layer
    errors = [
        bicluster_outer(weight, groups, rank=k, refine_iters=refine_iters).relative_error
        for k in range(1, 7)
    ]
    # Greedy deflation is nested, so strictly monotone; joint refinement may reorder slightly.
    slack = 1e-6 if refine_iters == 0 else 1e-3
    assert all(later <= earlier + slack for earlier, later in zip(errors, errors[1:], strict=False))


@FAST
@given(
    layers(),
    st.integers(1, 4),
    st.integers(1, 4),
    st.sampled_from(["svd", "outer"]),
    st.sampled_from([(1, 1, 0), (2, 1, 1), (1, 2, 2)]),
)
def test_stage_chain_equals_conv_with_reconstruction(layer, k1, k2, method, attrs):
    weight, groups = layer
    weight = weight.astype(np.float64)  # float64 factors: any layout slip shows above round-off
    stride, dilation, pad = attrs
    if method == "svd":
        fit = bicluster_svd(weight, groups, (k1, k2), seed=1)
    else:
        fit = bicluster_outer(weight, groups, rank=k1 * k2, seed=1)
    rng = np.random.default_rng(0)
    n, c = weight.shape[:2]
    x = rng.normal(size=(2, c, 9, 8))
    bias = rng.normal(size=n)
    spatial = {"stride": stride, "dilation": dilation, "pad": pad}
    expected = conv2d(x, fit.reconstruct(), **spatial)
    expected += bias[None, :, None, None]
    np.testing.assert_allclose(run_stages(x, fit.stages(bias), **spatial), expected, atol=1e-9)


@FAST
@given(layers(), st.integers(1, 3), st.sampled_from(["svd", "outer"]))
def test_stage_structure(layer, rank, method):
    weight, (g, h) = layer
    if method == "svd":
        fit = bicluster_svd(weight, (g, h), (rank, rank))
        middle_group = g * h
    else:
        fit = bicluster_outer(weight, (g, h), rank=rank)
        middle_group = fit.spatial_factors.shape[0]
    convs = [s for s in fit.stages() if s.kind == "conv"]
    assert [s.group for s in convs] == [g, middle_group, h]
    assert [s.spatial for s in convs] == [False, True, False]
    assert all(s.weight.shape[2:] == (1, 1) for s in (convs[0], convs[2]))
    assert convs[1].weight.shape[2:] == weight.shape[2:]
    assert all(s.weight.dtype == np.float32 for s in convs)
    assert convs[2].weight.shape[0] == weight.shape[0]
    assert (fit.mid_order is None) == (g == 1 or h == 1)
    if g == 1:
        assert fit.stages()[0].kind == "conv"
    for s in fit.stages():
        if s.kind == "gather":
            assert sorted(s.indices.tolist()) == list(range(len(s.indices)))


def test_shapes_dtypes_and_clipping():
    weight = np.random.default_rng(0).normal(size=(12, 8, 3, 3))
    fit = bicluster_svd(weight, (2, 3), (100, 2))
    assert fit.ranks == (4, 2)
    assert fit.input_factors.shape == (2 * 3 * 4, 4, 1, 1)
    assert fit.core.shape == (2 * 3 * 2, 4, 3, 3)
    assert fit.output_factors.shape == (12, 2 * 2, 1, 1)
    assert fit.mid_order.shape == (2 * 3 * 2,)
    assert fit.core.dtype == np.float64 and fit.reconstruct().shape == weight.shape
    outer = bicluster_outer(weight.astype(np.float32), (4, 2), rank=5)
    assert outer.rank == 5 and outer.spatial_factors.shape == (4 * 2 * 5, 1, 3, 3)
    assert outer.output_factors.shape == (12, 4 * 5, 1, 1)
    assert outer.output_factors.dtype == np.float32


def test_deterministic_under_seed():
    weight = np.random.default_rng(0).normal(size=(12, 8, 3, 3)).astype(np.float32)
    first, second = (bicluster_outer(weight, (2, 2), rank=3, seed=7) for _ in range(2))
    assert np.array_equal(first.reconstruct(), second.reconstruct())
    assert np.array_equal(first.in_order, second.in_order)


@pytest.mark.parametrize("groups", [(3, 1), (1, 5), (0, 1)])
def test_groups_must_divide_channels(groups):
    weight = np.zeros((12, 8, 3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="must divide"):
        bicluster_svd(weight, groups, (2, 2))
    with pytest.raises(ValueError, match="must divide"):
        bicluster_outer(weight, groups, 2)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**16))
def test_recovers_planted_clusters(n_clusters, size, other, seed):
    """Channels that are multiples of one prototype per cluster fit rank-1 blocks exactly."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(n_clusters), size))
    scale = rng.normal(size=n_clusters * size)
    inputs = rng.normal(size=(n_clusters, other, 3, 3))
    weight = np.einsum("c,cnyx->ncyx", scale, inputs[labels])
    assert bicluster_svd(weight, (n_clusters, 1), (1, other)).relative_error < 1e-9
    outputs = rng.normal(size=(n_clusters, other, 3, 3))
    weight = np.einsum("n,ncyx->ncyx", scale, outputs[labels])
    assert bicluster_svd(weight, (1, n_clusters), (other, 1)).relative_error < 1e-9
    assert bicluster_outer(weight, (1, n_clusters), rank=9).relative_error < 1e-9
