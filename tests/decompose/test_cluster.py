"""Balanced k-means: equal sizes, determinism, sign invariance, exact assignment."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_lowrank.decompose import cluster
from onnx_lowrank.decompose.cluster import balanced_assignment, balanced_kmeans

FAST = settings(max_examples=30, deadline=None)


@st.composite
def point_sets(draw):
    k = draw(st.integers(1, 5))
    n = k * draw(st.integers(1, 6))
    d = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    return np.random.default_rng(seed).normal(size=(n, d)), k


@FAST
@given(point_sets(), st.booleans())
def test_clusters_have_equal_sizes(data, sign_invariant):
    points, k = data
    result = balanced_kmeans(points, k, sign_invariant=sign_invariant)
    assert result.labels.shape == (len(points),)
    assert result.centres.shape == (k, points.shape[1])
    assert np.array_equal(np.bincount(result.labels, minlength=k), np.full(k, len(points) // k))


@FAST
@given(point_sets(), st.booleans())
def test_inertia_matches_signs_and_centres(data, sign_invariant):
    points, k = data
    result = balanced_kmeans(points, k, sign_invariant=sign_invariant)
    assert set(np.unique(result.signs)) <= ({-1.0, 1.0} if sign_invariant else {1.0})
    residual = points * result.signs[:, None] - result.centres[result.labels]
    assert result.inertia == pytest.approx(float((residual**2).sum()), rel=1e-9, abs=1e-9)


@FAST
@given(point_sets(), st.integers(0, 100))
def test_deterministic_under_seed(data, seed):
    points, k = data
    first = balanced_kmeans(points, k, seed=seed, sign_invariant=True)
    second = balanced_kmeans(points, k, seed=seed, sign_invariant=True)
    assert np.array_equal(first.labels, second.labels)
    assert np.array_equal(first.centres, second.centres)


@FAST
@given(point_sets(), st.integers(0, 2**16))
def test_sign_invariance(data, flip_seed):
    points, k = data
    flips = np.random.default_rng(flip_seed).choice([-1.0, 1.0], size=len(points))
    plain = balanced_kmeans(points, k, sign_invariant=True)
    flipped = balanced_kmeans(points * flips[:, None], k, sign_invariant=True)
    assert np.array_equal(plain.labels, flipped.labels)
    assert flipped.inertia == pytest.approx(plain.inertia, rel=1e-9, abs=1e-9)


def test_recovers_planted_lines_with_either_sign():
    rng = np.random.default_rng(1)
    directions = np.eye(4)[:3] * 10.0
    truth = np.repeat(np.arange(3), 8)
    points = directions[truth] * rng.choice([-1.0, 1.0], size=(24, 1))
    points += 0.01 * rng.normal(size=points.shape)
    result = balanced_kmeans(points, 3, sign_invariant=True)
    # Same partition up to renaming the clusters.
    pairs = set(zip(truth.tolist(), result.labels.tolist(), strict=True))
    assert len(pairs) == 3
    aligned = points * result.signs[:, None]
    assert np.all(np.einsum("nd,nd->n", aligned, result.centres[result.labels]) > 0)


def test_k_must_divide_n():
    with pytest.raises(ValueError, match="divisor"):
        balanced_kmeans(np.zeros((10, 2)), 3)


def test_duplicate_points_fewer_than_k():
    result = balanced_kmeans(np.ones((6, 2)), 3)
    assert np.array_equal(np.bincount(result.labels), [2, 2, 2])
    assert result.inertia == pytest.approx(0.0)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**16))
def test_exact_assignment_is_optimal(k, size, seed):
    cost = np.random.default_rng(seed).random((k * size, k))
    labels = balanced_assignment(cost)
    assert np.array_equal(np.bincount(labels, minlength=k), np.full(k, size))
    best = min(
        cost[np.arange(k * size), list(perm)].sum()
        for perm in set(itertools.permutations(np.repeat(np.arange(k), size)))
    )
    assert cost[np.arange(k * size), labels].sum() == pytest.approx(best)


def test_greedy_swap_path_is_balanced_and_near_optimal(monkeypatch):
    cost = np.random.default_rng(0).random((120, 6))
    exact = balanced_assignment(cost)
    monkeypatch.setattr(cluster, "_EXACT_MAX_POINTS", 10)
    approx = balanced_assignment(cost)
    assert np.array_equal(np.bincount(approx, minlength=6), np.full(6, 20))
    rows = np.arange(120)
    greedy = cluster._greedy_assignment(cost, 20)
    assert cost[rows, approx].sum() <= cost[rows, greedy].sum() + 1e-12
    assert cost[rows, approx].sum() <= 1.05 * cost[rows, exact].sum()
