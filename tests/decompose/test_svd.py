"""Property tests of the SVD family: exact at full rank, error non-increasing in rank, shapes and
dtypes kept, deterministic; and the rank pickers."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_lowrank.decompose import svd
from onnx_lowrank.decompose.rank import rank_for_energy, rank_for_error

FAST = settings(max_examples=40, deadline=None)


@st.composite
def weights(draw, one_d: bool = False):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    n = groups * draw(st.integers(1, 5))
    c = draw(st.integers(1, 5))
    kernel = [draw(st.integers(1, 4))] if one_d else [draw(st.integers(1, 4)) for _ in range(2)]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    return rng.standard_normal((n, c, *kernel)).astype(np.float32), groups


def _errors(fn, weight, ranks):
    return [svd.relative_error(fn(r).reconstruct(), weight) for r in ranks]


@FAST
@given(weights())
def test_spatial_separable(case):
    w, g = case
    n, c, kh, kw = w.shape
    full = min(c * kh, n // g * kw)
    f = svd.spatial_separable(w, full, g)
    assert f.vertical.shape == (full * g, c, kh, 1) and f.horizontal.shape == (n, full, 1, kw)
    assert f.vertical.dtype == np.float32 and f.reconstruct().shape == w.shape
    assert svd.relative_error(f.reconstruct(), w) < 1e-5
    errs = _errors(lambda r: svd.spatial_separable(w, r, g), w, range(1, full + 1))
    assert all(a >= b - 1e-6 for a, b in zip(errs, errs[1:]))
    again = svd.spatial_separable(w, max(1, full // 2), g)
    assert np.array_equal(again.vertical, svd.spatial_separable(w, max(1, full // 2), g).vertical)


@FAST
@given(st.booleans().flatmap(lambda one_d: weights(one_d=one_d)))
def test_channel_svd(case):
    w, g = case
    n, c = w.shape[:2]
    full = min(n // g, c * int(np.prod(w.shape[2:])))
    f = svd.channel_svd(w, full, g)
    assert f.spatial.shape == (full * g, c, *w.shape[2:])
    assert svd.relative_error(f.reconstruct(), w) < 1e-5
    errs = _errors(lambda r: svd.channel_svd(w, r, g), w, range(1, full + 1))
    assert all(a >= b - 1e-6 for a, b in zip(errs, errs[1:]))
    # truncation error is exactly the tail of the spectrum (Eckart-Young), group by group
    spectra = svd.channel_svd_spectrum(w, g)
    tail = sum((s[1:] ** 2).sum() for s in spectra)
    expected = np.sqrt(tail / (w.astype(np.float64) ** 2).sum())
    assert abs(errs[0] - expected) < 1e-5


@FAST
@given(st.booleans().flatmap(lambda one_d: weights(one_d=one_d)))
def test_tucker2(case):
    w, g = case
    n, c = w.shape[:2]
    f = svd.tucker2(w, (c, n // g), g)
    assert f.first.shape[:2] == (c * g, c) and f.last.shape[:2] == (n, n // g)
    assert svd.relative_error(f.reconstruct(), w) < 1e-5
    errs = [
        svd.relative_error(svd.tucker2(w, (r, r), g).reconstruct(), w)
        for r in range(1, min(c, n // g) + 1)
    ]
    assert all(a >= b - 1e-6 for a, b in zip(errs, errs[1:]))


@FAST
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**16))
def test_low_rank_matrix(rows, cols, seed):
    m = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    f = svd.low_rank_matrix(m, min(rows, cols))
    assert f.left.shape == (rows, min(rows, cols)) and f.right.shape == (min(rows, cols), cols)
    assert svd.relative_error(f.reconstruct(), m) < 1e-5
    assert svd.low_rank_matrix(m, 100).left.shape[1] == 100  # forced ranks are zero-padded


def test_spatial_separable_recovers_a_separable_kernel_at_rank_one():
    rng = np.random.default_rng(0)
    v, h = rng.standard_normal((4, 5)), rng.standard_normal((6, 3))
    w = np.einsum("cy,nx->ncyx", v, h).astype(np.float32)
    assert svd.relative_error(svd.spatial_separable(w, 1).reconstruct(), w) < 1e-6


def test_rank_pickers():
    s = np.array([4.0, 2.0, 1.0, 0.0])
    assert rank_for_energy(s, 16 / 21) == 1
    assert rank_for_energy(s, 0.9) == 2
    assert rank_for_energy(s, 1.0) == 3
    assert rank_for_error(s, np.sqrt(5 / 21) + 1e-9) == 1
    assert rank_for_error(s, 0.0) == 3
    assert rank_for_energy(np.zeros(3), 0.5) == 1
