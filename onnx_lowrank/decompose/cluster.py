"""Balanced k-means: k clusters of exactly n/k points each (Denton et al. 2014, section 3.4).

Lloyd iterations minimise the inertia ``sum_i d(x_i, c_{l(i)})`` under the constraint that every
cluster holds ``m = n/k`` points. The assignment step is then a transportation problem; with
the ``n x k`` cost matrix ``D`` and every centre repeated ``m`` times it is a square linear
assignment problem, solved exactly (``scipy.optimize.linear_sum_assignment``) for
``n <= 1024``. Above that, a regret-ordered greedy fill followed by pairwise-exchange refinement
(swap two points between two clusters while that lowers the cost) is used: not always optimal,
but it never increases the cost, so the Lloyd iterations still converge.

Sign-invariant clustering treats ``x`` and ``-x`` as the same line (Denton's colour vectors and
the subspace projection distance): ``d(x, c) = min_s ||s x - c||^2``, the sign ``s_i`` that
attains the minimum is recorded, and a centre is the mean of its points' sign-aligned copies,
so both steps lower the same objective. Starts are k-means++ under the same distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

_EXACT_MAX_POINTS = 1024  # linear_sum_assignment on n x n takes ~0.05 s at n = 1024
_MAX_SWAP_SWEEPS = 20


@dataclass(frozen=True)
class Clustering:
    """Result of `balanced_kmeans`."""

    labels: np.ndarray  # (n,) int64, each label used exactly n/k times
    centres: np.ndarray  # (k, d) float64
    signs: np.ndarray  # (n,) float64 of +-1: signs[i] * points[i] is near centres[labels[i]]
    inertia: float  # sum_i ||signs[i] * points[i] - centres[labels[i]]||^2


def balanced_kmeans(
    points: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    restarts: int = 5,
    max_iter: int = 100,
    sign_invariant: bool = False,
) -> Clustering:
    """Cluster the rows of ``points`` (n, d) into ``k`` clusters of exactly n/k rows each.

    Runs ``restarts`` k-means++ starts and keeps the lowest inertia; deterministic under ``seed``.
    Without ``sign_invariant`` every sign is +1.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2:
        raise ValueError(f"points must be a 2-D (n, d) array, got shape {points.shape}.")
    n = points.shape[0]
    if k < 1 or n % k != 0:
        raise ValueError(f"k={k} must be a positive divisor of the number of points n={n}.")
    rng = np.random.default_rng(seed)
    best: Clustering | None = None
    for _ in range(max(1, restarts)):
        centres = _kmeans_plus_plus(points, k, rng, sign_invariant)
        result = _lloyd(points, centres, max_iter, sign_invariant)
        if best is None or result.inertia < best.inertia:
            best = result
    return best


def balanced_assignment(cost: np.ndarray, initial: np.ndarray | None = None) -> np.ndarray:
    """Labels minimising ``sum_i cost[i, labels[i]]``, each of the k columns used n/k times.

    ``cost`` is (n, k) with k dividing n. Exact for n <= 1024; above, pairwise swaps refine
    ``initial`` (a balanced labelling, e.g. the previous Lloyd step's) or a greedy fill.
    """
    n, k = cost.shape
    if n % k != 0:
        raise ValueError(f"{k} clusters cannot split {n} points into equal sizes.")
    size = n // k
    if n <= _EXACT_MAX_POINTS:
        rows, cols = linear_sum_assignment(np.repeat(cost, size, axis=1))
        labels = np.empty(n, dtype=np.int64)
        labels[rows] = cols // size
        return labels
    labels = _greedy_assignment(cost, size) if initial is None else initial.copy()
    _swap_refine(cost, labels)
    return labels


def _distances(points: np.ndarray, centres: np.ndarray, sign_invariant: bool):
    """Squared distances (n, k) and the sign (n, k) of each point's best copy."""
    cross = points @ centres.T
    signs = np.where(cross < 0, -1.0, 1.0) if sign_invariant else np.ones_like(cross)
    sq = (points**2).sum(1)[:, None] + (centres**2).sum(1)[None, :] - 2.0 * signs * cross
    return np.maximum(sq, 0.0), signs


def _kmeans_plus_plus(points, k, rng, sign_invariant) -> np.ndarray:
    n = points.shape[0]
    chosen = [int(rng.integers(n))]
    closest = _distances(points, points[chosen], sign_invariant)[0][:, 0]
    for _ in range(1, k):
        total = closest.sum()
        # Fewer distinct points (or lines) than k: fall back to a uniform pick.
        probs = closest / total if total > 0 else np.full(n, 1.0 / n)
        chosen.append(int(rng.choice(n, p=probs)))
        new = _distances(points, points[chosen[-1:]], sign_invariant)[0][:, 0]
        closest = np.minimum(closest, new)
    return points[chosen].copy()


def _lloyd(points, centres, max_iter, sign_invariant) -> Clustering:
    k = centres.shape[0]
    labels = None
    for _ in range(max(1, max_iter)):
        dist, sign_table = _distances(points, centres, sign_invariant)
        new_labels = balanced_assignment(dist, labels)
        signs = sign_table[np.arange(len(points)), new_labels]
        aligned = points * signs[:, None]
        centres = np.stack([aligned[new_labels == j].mean(0) for j in range(k)])
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
    labels = new_labels
    dist, sign_table = _distances(points, centres, sign_invariant)
    rows = np.arange(len(points))
    signs = sign_table[rows, labels]
    inertia = float(((points * signs[:, None] - centres[labels]) ** 2).sum())
    return Clustering(labels=labels, centres=centres, signs=signs, inertia=inertia)


def _greedy_assignment(cost: np.ndarray, size: int) -> np.ndarray:
    """Fill clusters in order of regret (how much a point loses if it misses its best cluster)."""
    n, k = cost.shape
    ranked = np.argsort(cost, axis=1)
    rows = np.arange(n)
    regret = cost[rows, ranked[:, min(1, k - 1)]] - cost[rows, ranked[:, 0]]
    room = np.full(k, size)
    labels = np.empty(n, dtype=np.int64)
    for i in np.argsort(-regret, kind="stable"):
        j = next(c for c in ranked[i] if room[c] > 0)
        labels[i] = j
        room[j] -= 1
    return labels


def _swap_refine(cost: np.ndarray, labels: np.ndarray) -> None:
    """Exchange points between cluster pairs while a swap lowers the total cost (in place)."""
    k = cost.shape[1]
    for _ in range(_MAX_SWAP_SWEEPS):
        swapped = False
        for a in range(k):
            for b in range(a + 1, k):
                in_a, in_b = np.flatnonzero(labels == a), np.flatnonzero(labels == b)
                gain_a = cost[in_a, a] - cost[in_a, b]  # > 0: the point prefers b
                gain_b = cost[in_b, b] - cost[in_b, a]
                order_a, order_b = np.argsort(-gain_a), np.argsort(-gain_b)
                # Both sorted descending, so the pair gains are too: swap the positive prefix.
                count = int((gain_a[order_a] + gain_b[order_b] > 1e-12).sum())
                if count:
                    labels[in_a[order_a[:count]]] = b
                    labels[in_b[order_b[:count]]] = a
                    swapped = True
        if not swapped:
            return
