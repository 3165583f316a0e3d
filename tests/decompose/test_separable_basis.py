"""Separable filter basis (scheme 1): exact recovery, layout, monotonicity, degeneracy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_lowrank.decompose.separable_basis import separable_basis

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - optional, only keeps small BLAS calls single-threaded
    threadpool_limits = None


@pytest.fixture(autouse=True)
def _single_threaded_blas():
    """Tiny matrix products spin on multi-threaded BLAS when the cores are shared."""
    if threadpool_limits is None:
        yield
    else:
        with threadpool_limits(limits=1, user_api="blas"):
            yield


def _basis_kernel(n: int, c: int, kernel: tuple[int, int], rank: int, seed: int) -> np.ndarray:
    """``M`` random separable filters per input channel, mixed by random coefficients."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((n, c, rank))
    vertical = rng.standard_normal((c, rank, kernel[0]))
    horizontal = rng.standard_normal((c, rank, kernel[1]))
    return np.einsum("ncm,cmy,cmx->ncyx", mixing, vertical, horizontal)


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(4, 12),
    c=st.integers(1, 3),
    kernel=st.sampled_from([(3, 3), (5, 5), (1, 3), (3, 1)]),
    rank=st.integers(1, 2),
    seed=st.integers(0, 1000),
)
def test_recovers_a_known_basis(n, c, kernel, rank, seed):
    weight = _basis_kernel(n, c, kernel, rank, seed)
    basis = separable_basis(weight, rank, seed=seed)
    assert basis.relative_error < 1e-5
    assert basis.degenerate_channels == ()


def test_recovers_three_filters_on_five_by_five():
    weight = _basis_kernel(16, 4, (5, 5), 3, seed=1)
    assert separable_basis(weight, 3).relative_error < 1e-5


def test_layout_shapes_and_dtypes():
    weight = np.random.default_rng(0).standard_normal((6, 4, 3, 5)).astype(np.float32)
    basis = separable_basis(weight, 2)
    assert basis.vertical.shape == (8, 1, 3, 1)
    assert basis.horizontal.shape == (8, 1, 1, 5)
    assert basis.mixing.shape == (6, 8, 1, 1)
    for array in (basis.vertical, basis.horizontal, basis.mixing):
        assert array.dtype == np.float32 and np.all(np.isfinite(array))
    rebuilt = basis.reconstruct()
    assert rebuilt.shape == weight.shape
    # Channel c*M + m belongs to input channel c: input channel 1 is rebuilt from 2 and 3 alone.
    slice_1 = np.einsum(
        "nq,qy,qx->nyx",
        basis.mixing[:, 2:4, 0, 0],
        basis.vertical[2:4, 0, :, 0],
        basis.horizontal[2:4, 0, 0, :],
    )
    np.testing.assert_allclose(slice_1, rebuilt[:, 1], rtol=1e-5, atol=1e-6)
    error = np.linalg.norm(weight - rebuilt) / np.linalg.norm(weight)
    assert error == pytest.approx(basis.relative_error, rel=1e-6)


def test_error_does_not_increase_with_rank():
    # Independent per-channel non-convex fits: 1e-3 slack absorbs neighbouring local minima.
    weight = np.random.default_rng(2).standard_normal((8, 2, 3, 3))
    errors = [separable_basis(weight, rank).relative_error for rank in (1, 2, 3, 5)]
    assert all(later <= earlier + 1e-3 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < errors[0] - 0.2


def test_border_rank_channels_stay_bounded():
    rng = np.random.default_rng(0)
    weight = np.zeros((6, 2, 3, 3))
    for c in range(2):
        a = [rng.standard_normal(size) for size in (6, 3, 3)]
        b = [rng.standard_normal(size) for size in (6, 3, 3)]
        for k in range(3):
            vectors = [b[j] if j == k else a[j] for j in range(3)]
            weight[:, c] += np.einsum("n,y,x->nyx", *vectors)
    basis = separable_basis(weight, 2)
    arrays = (basis.vertical, basis.horizontal, basis.mixing)
    assert all(np.all(np.isfinite(array)) for array in arrays)
    bound = 10 * np.abs(weight).max()
    assert basis.degenerate_channels or all(np.abs(array).max() < bound for array in arrays)


def test_same_seed_same_basis():
    weight = np.random.default_rng(5).standard_normal((7, 3, 3, 3))
    first, second = separable_basis(weight, 2, seed=4), separable_basis(weight, 2, seed=4)
    for name in ("vertical", "horizontal", "mixing"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


def test_bad_input():
    with pytest.raises(ValueError, match="4-D"):
        separable_basis(np.ones((3, 3, 3)), 1)
    with pytest.raises(ValueError, match="rank"):
        separable_basis(np.ones((3, 3, 3, 3)), 0)
