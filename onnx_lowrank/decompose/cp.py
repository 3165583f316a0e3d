"""CP four-conv chain for a conv kernel (Lebedev et al. 2015, arXiv:1412.6553).

A kernel ``W`` of shape ``(N, C, kH, kW)`` is approximated by ``R`` rank-1 terms,
``W[n,c,y,x] ~ sum_r T[n,r] Y[r,y] X[r,x] S[r,c]``, which runs as four convs: a 1x1 ``C -> R``
(``S``), a ``kH x 1`` depthwise (``Y``), a ``1 x kW`` depthwise (``X``) and a 1x1 ``R -> N``
(``T``, bias). The factors minimise ``||W - [[T, S, Y, X]]||_F`` by non-linear least squares
over all factors at once: Levenberg-Marquardt with the structured Gauss-Newton matrix and
preconditioned CG of cp_nls.py, started from an SVD guess polished by a few ALS sweeps. ALS
(Carroll & Chang 1970; Harshman 1970) is the baseline and the fallback.

Best rank-R approximations need not exist; fits then drift towards *degenerate* solutions where
terms grow without bound while cancelling, which float32 inference cannot represent. A fit is
flagged degenerate when ``sqrt(sum_r ||term_r||^2) / ||W||`` exceeds 10, or when two terms are
nearly opposite (Tucker congruence below -0.95) while that ratio exceeds 3. Every fit carries a
Tikhonov penalty ``mu/2 sum ||factor||^2`` with ``mu = 1e-5 ||misfit||^2`` (vanishing for exact
fits); a flagged fit is continued with ``mu`` = 1e-6, 1e-4, 1e-2 (of ``||W||^2``) in turn, which
keeps the norms bounded at a small cost in error. Every returned term has its norm
spread equally over the four factors, so the four float32 convs are equally well scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_lowrank.decompose import cp_nls as engine

DEGENERATE_NORM_RATIO = 10.0
DEGENERATE_CONGRUENCE = -0.95
MU_PER_MISFIT = 1e-5
WARMUP_SWEEPS = 10
SMALL_PROBLEM = 5_000  # kernel entries x rank under which cp_decompose restarts a poor fit
SMALL_RESTARTS = 4


@dataclass(frozen=True)
class CPFactors:
    """Rank-R CP of a conv kernel as the weights of the four-conv chain."""

    first: np.ndarray  # (R, C, 1, 1)  conv weight of the first 1x1  (S)
    vertical: np.ndarray  # (R, 1, kH, 1) depthwise kx1 weights (Y)
    horizontal: np.ndarray  # (R, 1, 1, kW) depthwise 1xk weights (X)
    last: np.ndarray  # (N, R, 1, 1)  conv weight of the last 1x1 (T)
    relative_error: float  # ||W - reconstruct()||_F / ||W||_F
    method: str  # "nls" or "als"
    iterations: int
    degenerate: bool

    @property
    def rank(self) -> int:
        """Number of rank-1 terms R."""
        return int(self.first.shape[0])

    def reconstruct(self) -> np.ndarray:
        """The dense ``(N, C, kH, kW)`` kernel the chain computes."""
        return np.einsum(
            "nr,rc,ry,rx->ncyx",
            self.last[:, :, 0, 0],
            self.first[:, :, 0, 0],
            self.vertical[:, 0, :, 0],
            self.horizontal[:, 0, 0, :],
        )


@dataclass(frozen=True)
class TensorFit:
    """A d-way CP fit: float64 factors ``(I_k, R)`` and how it was obtained."""

    factors: tuple[np.ndarray, ...]
    method: str
    iterations: int
    degenerate: bool


def _svd_init(tensor: np.ndarray, rank: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Leading left singular vectors of each unfolding, random columns past the mode size."""
    factors = []
    for k, size in enumerate(tensor.shape):
        unfolded = np.moveaxis(tensor, k, 0).reshape(size, -1)
        _, vectors = np.linalg.eigh(unfolded @ unfolded.T)
        columns = vectors[:, ::-1][:, : min(rank, size)]
        extra = rng.standard_normal((size, rank - columns.shape[1])) / np.sqrt(size)
        factors.append(np.hstack([columns, extra]))
    return factors


def _compress(tensor: np.ndarray) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Project modes longer than the product of the others onto their range (CANDELINC).

    The optimal factor of such a mode lies in the range of its unfolding, so fitting the
    smaller core and mapping back is exact and much cheaper (e.g. ``N >> kH kW`` per channel).
    """
    bases: list[np.ndarray | None] = []
    for k, size in enumerate(tensor.shape):
        unfolded = np.moveaxis(tensor, k, 0).reshape(size, -1)
        if size <= unfolded.shape[1]:
            bases.append(None)
            continue
        basis = np.linalg.svd(unfolded, full_matrices=False)[0]
        tensor = np.moveaxis(np.tensordot(basis.T, np.moveaxis(tensor, k, 0), axes=1), 0, k)
        bases.append(basis)
    return tensor, bases


def _is_degenerate(factors: list[np.ndarray]) -> bool:
    ratio, congruence = engine.diagnostics(factors)
    if not np.isfinite(ratio):
        return True
    return ratio > DEGENERATE_NORM_RATIO or (congruence < DEGENERATE_CONGRUENCE and ratio > 3.0)


def _finite(factors: list[np.ndarray]) -> bool:
    return all(np.all(np.isfinite(a)) for a in factors)


def fit_tensor(
    tensor: np.ndarray,
    rank: int,
    *,
    seed: int = 0,
    method: str = "nls",
    max_iter: int = 200,
    tol: float = 1e-8,
    init=None,
) -> TensorFit:
    """Rank-``rank`` CP of a d-way float array, normalised, with degeneracy control.

    ``init`` (optional, factors of the *unit-norm* tensor) replaces the SVD + ALS start.
    """
    if method not in ("nls", "als"):
        raise ValueError(f"CP method must be 'nls' or 'als', not {method!r}.")
    norm = float(np.linalg.norm(tensor))
    if norm == 0.0 or not np.isfinite(norm):
        if not np.isfinite(norm):
            raise ValueError("The kernel holds non-finite values.")
        return TensorFit(tuple(np.zeros((s, rank)) for s in tensor.shape), method, 0, False)
    core, bases = _compress(np.asarray(tensor, dtype=np.float64) / norm)
    rng = np.random.default_rng(seed)
    if init is None:
        start, warmup = engine.als(
            core, _svd_init(core, rank, rng), max_iter=WARMUP_SWEEPS, tol=tol, mu=0.0
        )
    else:
        start, warmup = [b.T @ a if b is not None else a for a, b in zip(init, bases)], 0
    # The first run penalises in proportion to the misfit: negligible for exactly representable
    # kernels, enough on noisy ones to slow the norm drift of a degenerate valley. A flagged
    # run is continued with a fixed, growing penalty.
    factors, iterations, degenerate = start, warmup, False
    solver = engine.levenberg_marquardt if method == "nls" else engine.als
    for mu, per_misfit in ((0.0, MU_PER_MISFIT), (1e-6, 0.0), (1e-4, 0.0), (1e-2, 0.0)):
        fitted, steps = solver(
            core, factors, max_iter=max_iter, tol=tol, mu=mu, mu_per_misfit=per_misfit
        )
        if not _finite(fitted):
            # ALS is the fallback when a Gauss-Newton run breaks down.
            fitted, steps = engine.als(core, start, max_iter=max_iter, tol=tol, mu=max(mu, 1e-6))
            method = "als"
        factors, iterations = fitted, iterations + steps
        if not _is_degenerate(factors):
            break
        degenerate = True
    if not _finite(factors):
        factors = [np.zeros_like(a) for a in factors]
    scale = norm ** (1.0 / len(factors))
    full = [(b @ a if b is not None else a) * scale for a, b in zip(factors, bases, strict=True)]
    return TensorFit(tuple(engine.balance(full)), method, iterations, degenerate)


def _chain(weight: np.ndarray, fit: TensorFit) -> CPFactors:
    """Lay the four float32 conv weights out and measure the error they really give."""
    last, first, vertical, horizontal = (a.astype(np.float32) for a in fit.factors)
    rank = last.shape[1]
    factors = CPFactors(
        first=np.ascontiguousarray(first.T).reshape(rank, -1, 1, 1),
        vertical=np.ascontiguousarray(vertical.T).reshape(rank, 1, -1, 1),
        horizontal=np.ascontiguousarray(horizontal.T).reshape(rank, 1, 1, -1),
        last=last.reshape(last.shape[0], rank, 1, 1),
        relative_error=0.0,
        method=fit.method,
        iterations=fit.iterations,
        degenerate=fit.degenerate,
    )
    error = relative_error(weight, factors.reconstruct())
    return CPFactors(**{**factors.__dict__, "relative_error": error})


def relative_error(weight: np.ndarray, approx: np.ndarray) -> float:
    """``||W - approx||_F / ||W||_F`` in float64 (0 for a zero kernel fitted exactly)."""
    weight = np.asarray(weight, dtype=np.float64)
    diff = float(np.linalg.norm(weight - approx))
    norm = float(np.linalg.norm(weight))
    return diff / norm if norm > 0 else diff


def _check(weight: np.ndarray, rank: int) -> np.ndarray:
    weight = np.asarray(weight)
    if weight.ndim != 4:
        raise ValueError(f"CP expects a 4-D conv kernel (N, C, kH, kW), got shape {weight.shape}.")
    if rank < 1:
        raise ValueError(f"CP rank must be at least 1, got {rank}.")
    return weight.astype(np.float64)


def cp_decompose(
    weight: np.ndarray,
    rank: int,
    *,
    seed: int = 0,
    method: str = "nls",
    max_iter: int | None = None,
    tol: float = 1e-8,
) -> CPFactors:
    """Rank-``rank`` CP of a conv kernel ``(N, C, kH, kW)`` by NLS (default) or ALS.

    ``max_iter`` counts LM iterations for NLS (default 200) and sweeps for ALS (default 500);
    ``tol`` stops when the relative decrease of the objective per iteration falls below it.
    """
    kernel = _check(weight, rank)
    budget = max_iter if max_iter is not None else (200 if method == "nls" else 500)
    best = _chain(
        kernel, fit_tensor(kernel, rank, seed=seed, method=method, max_iter=budget, tol=tol)
    )
    # A non-convex fit can stop in a local minimum. Small kernels cost little to refit, so they
    # get a few random restarts (seeded, so the result stays reproducible); the best is kept.
    restarts = SMALL_RESTARTS if kernel.size * rank <= SMALL_PROBLEM else 0
    rng = np.random.default_rng([seed, rank])
    for _ in range(restarts):
        if best.relative_error < 1e-7:
            break
        init = [rng.standard_normal((size, rank)) / np.sqrt(size) for size in kernel.shape]
        fit = fit_tensor(
            kernel, rank, seed=seed, method=method, max_iter=budget, tol=tol, init=init
        )
        candidate = _chain(kernel, fit)
        if candidate.relative_error < best.relative_error:
            best = candidate
    return best


def cp_als(
    weight: np.ndarray, rank: int, *, seed: int = 0, max_iter: int = 500, tol: float = 1e-8
) -> CPFactors:
    """Rank-``rank`` CP of a conv kernel by (ridge) alternating least squares."""
    return cp_decompose(weight, rank, seed=seed, method="als", max_iter=max_iter, tol=tol)


def cp_nls(
    weight: np.ndarray, rank: int, *, seed: int = 0, max_iter: int = 200, tol: float = 1e-8
) -> CPFactors:
    """Rank-``rank`` CP of a conv kernel by Levenberg-Marquardt on all factors at once."""
    return cp_decompose(weight, rank, seed=seed, method="nls", max_iter=max_iter, tol=tol)


def _grown(fit: TensorFit, rank: int, norm: float, seed: int) -> list[np.ndarray]:
    """A lower-rank fit (rescaled to the unit-norm tensor) padded with small random terms."""
    rng = np.random.default_rng([seed, rank])
    scale = norm ** (1.0 / len(fit.factors))
    grown = []
    for a in fit.factors:
        extra = 0.1 * rng.standard_normal((a.shape[0], rank - a.shape[1])) / np.sqrt(a.shape[0])
        grown.append(np.hstack([a / scale, extra]))
    return grown


def cp_rank_for_error(
    weight: np.ndarray,
    max_error: float,
    *,
    seed: int = 0,
    method: str = "nls",
    min_rank: int = 1,
    max_rank: int | None = None,
    max_iter: int | None = None,
    tol: float = 1e-8,
) -> int:
    """Smallest rank in ``[min_rank, max_rank]`` whose CP fit has relative error <= max_error.

    Doubles the rank from ``min_rank`` until a fit meets ``max_error``, then bisects between
    the last miss and the first hit. Each fit after the first starts from the best fit at a
    lower rank padded with small random terms, so errors decrease with rank as the search
    assumes. ``max_rank`` defaults to the rank at which the four-conv chain costs as many
    multiply-adds as the dense conv; it is returned when no rank in range is accurate enough
    (the caller checks the error of the fit it then makes).
    """
    n, c, kh, kw = _check(weight, min_rank).shape
    if max_rank is None:
        max_rank = max(min_rank, n * c * kh * kw // (n + c + kh + kw))
    kernel = weight.astype(np.float64)
    norm = float(np.linalg.norm(kernel))
    budget = max_iter if max_iter is not None else (200 if method == "nls" else 500)
    fits: dict[int, TensorFit] = {}

    def meets(rank: int) -> bool:
        below = [r for r in fits if r < rank]
        init = _grown(fits[max(below)], rank, norm, seed) if below and norm > 0 else None
        fits[rank] = fit_tensor(
            kernel, rank, seed=seed, method=method, max_iter=budget, tol=tol, init=init
        )
        return _chain(kernel, fits[rank]).relative_error <= max_error

    miss, rank = min_rank - 1, min_rank
    while not meets(rank):
        miss = rank
        if rank >= max_rank:
            return max_rank
        rank = min(2 * rank, max_rank)
    hit = rank
    while hit - miss > 1:
        middle = (hit + miss) // 2
        hit, miss = (middle, miss) if meets(middle) else (hit, middle)
    return hit
