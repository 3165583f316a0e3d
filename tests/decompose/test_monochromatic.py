"""Monochromatic approximation: exact on colour-line kernels, optimal per filter at C' = N,
and the ONNX stage chain equals a conv with the reconstructed weight."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_lowrank.decompose.monochromatic import monochromatic, nearest_divisor

FAST = settings(max_examples=30, deadline=None)


def conv2d(x, weight, group=1):
    """ONNX Conv (stride 1, no padding): output group j reads only input group j."""
    batch, channels, height, width = x.shape
    out_ch, per_group, kh, kw = weight.shape
    oh, ow = height - kh + 1, width - kw + 1
    xg = x.reshape(batch, group, per_group, height, width)
    wg = weight.reshape(group, out_ch // group, per_group, kh, kw)
    out = np.zeros((batch, group, out_ch // group, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = xg[:, :, :, i : i + oh, j : j + ow]
            out += np.einsum("bgcyx,goc->bgoyx", patch, wg[..., i, j])
    return out.reshape(batch, out_ch, oh, ow)


def run_stages(x, stages):
    """Run a Stage chain as ONNX would."""
    for stage in stages:
        if stage.kind == "gather":
            x = x[:, stage.indices]
            continue
        x = conv2d(x, stage.weight, stage.group)
        if stage.bias is not None:
            x = x + stage.bias[None, :, None, None]
    return x


@st.composite
def colour_line_kernels(draw):
    """Filters that are each rank-1 in colour, on n_colors lines used equally (either sign)."""
    channels = draw(st.integers(1, 4))
    n_colors = draw(st.integers(1, 4))
    per_color = draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    lines = rng.normal(size=(n_colors, channels))
    labels = rng.permutation(np.repeat(np.arange(n_colors), per_color))
    signs = rng.choice([-1.0, 1.0], size=len(labels))
    spatial = rng.normal(size=(len(labels), kh, kw))
    weight = np.einsum("fc,fyx->fcyx", lines[labels] * signs[:, None], spatial)
    return weight, n_colors


@FAST
@given(colour_line_kernels())
def test_exact_on_colour_line_kernels(case):
    weight, n_colors = case
    fit = monochromatic(weight, n_colors)
    assert fit.relative_error < 1e-9
    np.testing.assert_allclose(fit.reconstruct(), weight, atol=1e-9)


@FAST
@given(st.integers(1, 4), st.integers(1, 12), st.integers(1, 3), st.integers(0, 2**16))
def test_one_colour_per_filter_is_the_rank1_truncation(channels, n_filters, size, seed):
    weight = np.random.default_rng(seed).normal(size=(n_filters, channels, size, size))
    fit = monochromatic(weight, n_filters)
    matrices = weight.reshape(n_filters, channels, -1)
    singular = np.linalg.svd(matrices, compute_uv=False)
    expected = np.sqrt((singular[:, 1:] ** 2).sum()) / np.linalg.norm(weight)
    assert fit.relative_error == pytest.approx(expected, abs=1e-9)
    # No clustering can beat every filter getting its own best colour.
    for n_colors in (1, nearest_divisor(n_filters, 2)):
        assert monochromatic(weight, n_colors).relative_error >= fit.relative_error - 1e-12


@FAST
@given(
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(0, 2**16),
)
def test_stage_chain_equals_conv_with_reconstruction(channels, n_colors, per_color, kh, kw, seed):
    rng = np.random.default_rng(seed)
    n_filters = n_colors * per_color
    weight = rng.normal(size=(n_filters, channels, kh, kw))
    fit = monochromatic(weight, n_colors, seed=seed)
    x = rng.normal(size=(2, channels, 6, 7))
    bias = rng.normal(size=n_filters)
    expected = conv2d(x, fit.reconstruct()) + bias[None, :, None, None]
    np.testing.assert_allclose(run_stages(x, fit.stages(bias)), expected, atol=1e-9)


def test_stage_structure_shapes_and_dtypes():
    weight = np.random.default_rng(0).normal(size=(96, 3, 7, 7)).astype(np.float32)
    fit = monochromatic(weight, 6)
    assert fit.colors.shape == (6, 3, 1, 1) and fit.colors.dtype == np.float32
    assert fit.spatial.shape == (96, 1, 7, 7) and fit.spatial.dtype == np.float32
    assert sorted(fit.order.tolist()) == list(range(96))
    assert fit.reconstruct().shape == weight.shape and fit.reconstruct().dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fit.colors[:, :, 0, 0], axis=1), 1.0, rtol=1e-6)
    stages = fit.stages()
    assert [s.kind for s in stages] == ["conv", "conv", "gather"]
    assert [s.group for s in stages[:2]] == [1, 6]
    assert [s.spatial for s in stages[:2]] == [False, True]
    assert 0.0 < fit.relative_error < 1.0


def test_deterministic_under_seed():
    weight = np.random.default_rng(1).normal(size=(24, 3, 5, 5)).astype(np.float32)
    first, second = monochromatic(weight, 4, seed=3), monochromatic(weight, 4, seed=3)
    assert np.array_equal(first.order, second.order)
    assert np.array_equal(first.spatial, second.spatial)


def test_n_colors_must_divide_filters():
    with pytest.raises(ValueError, match="divisor"):
        monochromatic(np.ones((10, 3, 3, 3)), 4)


@pytest.mark.parametrize(
    ("n", "c", "expected"), [(96, 6, 6), (96, 5, 6), (96, 7, 8), (7, 3, 1), (12, 100, 12)]
)
def test_nearest_divisor(n, c, expected):
    assert nearest_divisor(n, c) == expected
