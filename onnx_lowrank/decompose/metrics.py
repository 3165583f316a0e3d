"""Data-aware fitting metrics (Denton et al. 2014, section 3.1; Jaderberg et al. 2014, data
optimisation), in closed form.

- Data-covariance metric: with S = E[p p^T] the second moment of the inputs a factor reads
  (input patches of the layer, or of its first stage), the output error of a linear map M is
  ||(M - M') S^(1/2)||_F. Its best rank-k M' is the projection of M onto the leading
  singular subspace of the whitened map: for W (out x in) read as y = W p, W' = U_k U_k^T W
  with U_k from svd(W S^(1/2)); for M read as y = M^T p, M' = M V_k V_k^T with V_k from
  svd(S^(1/2) M)^T. No inverse of S is needed, and with S = I both are the plain truncated SVD.
- Chains that open with a 1x1 conv over the input channels (tucker2, cp): with S the second
  moment of the input channels, W x = (W S^(1/2)) (S^(-1/2) x), so the weight with its input
  channels whitened, W S^(1/2), is factored by the method as it is, and the first 1x1 conv takes
  S^(-1/2) back: the factorization's own error becomes the output error on the data. S = I
  gives the weight-only fit.
- Data reconstruction: the last factor of a chain is linear in its weights given the chain's
  intermediate activations Z, so min ||Y - Z A||^2 is the ridge-regularised normal equations
  (Z^T Z + lambda I) A = Z^T Y, solved from accumulated Gram matrices.
S is regularised by a small multiple of its mean eigenvalue so rank-deficient inputs stay stable.
"""

from __future__ import annotations

import numpy as np

from .svd import ChannelSVD, LowRankMatrix, SpatialSeparable, _blocks, _f32, _separable_matrix

RIDGE = 1e-4  # relative to the mean diagonal of a Gram/moment matrix
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # tried by cross-validation for a least-squares refit
# with a prior (the weights before the refit) the ridge shrinks towards it, so stronger ones are
# worth trying: the strongest gives back the prior
PRIOR_RIDGES = RIDGES + (10.0, 100.0)


def _ridge_weight(moment: np.ndarray, ridge: float) -> float:
    """ridge * mean(diag S), or 1 when S is all zero."""
    scale = float(np.trace(moment)) / len(moment) if len(moment) else 0.0
    return ridge * scale if scale > 0 else 1.0


def regularized(moment: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """S + ridge * mean(diag S) * I (identity when S is all zero)."""
    moment = np.asarray(moment, np.float64)
    return moment + _ridge_weight(moment, ridge) * np.eye(len(moment))


def _top_eigvecs(gram: np.ndarray, rank: int) -> np.ndarray:
    """The `rank` leading eigenvectors of a symmetric PSD matrix, zero-padded past its size."""
    values, vectors = np.linalg.eigh(gram)
    top = vectors[:, np.argsort(values)[::-1][:rank]]
    return np.pad(top, ((0, 0), (0, rank - top.shape[1])))


def _eig_spectrum(gram: np.ndarray) -> np.ndarray:
    """Singular values of X from the Gram matrix X X^T (or X^T X)."""
    return np.sqrt(np.clip(np.sort(np.linalg.eigvalsh(gram))[::-1], 0.0, None))


# The whitened maps are never formed: the left singular vectors of W S^(1/2) are the
# eigenvectors of W S W^T (out x out), and the right ones of S^(1/2) M those of M^T S M, which
# avoids the square root of a patch moment that can be thousands wide (an 8x8 kernel on 128
# channels: 8192).


def whitened_channel_spectrum(weight: np.ndarray, moments: list[np.ndarray], groups: int = 1):
    """Singular values of each group's W S^(1/2) (the data energy of channel SVD)."""
    out = []
    for block, moment in zip(_blocks(weight, groups), moments):
        matrix = block.reshape(len(block), -1)
        out.append(_eig_spectrum(matrix @ regularized(moment) @ matrix.T))
    return out


def whitened_channel_svd(
    weight: np.ndarray, rank: int, moments: list[np.ndarray], groups: int = 1
) -> ChannelSVD:
    """Channel SVD minimising the output error on inputs with patch second moments `moments`
    (one (C/g*k) x (C/g*k) matrix per group)."""
    spatials, pointwises = [], []
    ones = (1,) * (weight.ndim - 2)
    for block, moment in zip(_blocks(weight, groups), moments):
        matrix = block.reshape(len(block), -1)
        u = _top_eigvecs(matrix @ regularized(moment) @ matrix.T, rank)
        spatials.append((u.T @ matrix).reshape(rank, *block.shape[1:]))
        pointwises.append(u.reshape(len(block), rank, *ones))
    return ChannelSVD(_f32(spatials), _f32(pointwises), groups)


def whitened_separable_spectrum(weight: np.ndarray, moments: list[np.ndarray], groups: int = 1):
    """Singular values of each group's S^(1/2) M, M the (C*kH) x (N*kW) unfolding."""
    out = []
    for block, moment in zip(_blocks(weight, groups), moments):
        matrix = _separable_matrix(block)
        out.append(_eig_spectrum(matrix.T @ regularized(moment) @ matrix))
    return out


def whitened_separable(
    weight: np.ndarray, rank: int, moments: list[np.ndarray], groups: int = 1
) -> SpatialSeparable:
    """Spatial separable fit weighted by the second moment of the vertical conv's input
    patches (C/g*kH per group). Cross-column correlations are ignored: the least-squares refit
    of the horizontal conv accounts for them."""
    verticals, horizontals = [], []
    for block, moment in zip(_blocks(weight, groups), moments):
        n, c, kh, kw = block.shape
        matrix = _separable_matrix(block)
        vt = _top_eigvecs(matrix.T @ regularized(moment) @ matrix, rank).T
        left = matrix @ vt.T  # (C*kH, K)
        verticals.append(left.T.reshape(rank, c, kh, 1))
        horizontals.append(vt.reshape(rank, n, kw).transpose(1, 0, 2).reshape(n, rank, 1, kw))
    return SpatialSeparable(_f32(verticals), _f32(horizontals), groups)


def whitened_low_rank(matrix: np.ndarray, rank: int, moment: np.ndarray) -> LowRankMatrix:
    """A fully connected weight W (in x out, y = x W) fitted for inputs with second moment S:
    W' = W V_k V_k^T, V_k the leading eigenvectors of W^T S W; factors W V_k and V_k^T."""
    matrix = np.asarray(matrix, np.float64)
    vt = _top_eigvecs(matrix.T @ regularized(moment) @ matrix, rank).T
    return LowRankMatrix((matrix @ vt.T).astype(np.float32), vt.astype(np.float32))


def whitened_matrix_spectrum(matrix: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """Singular values of S^(1/2) W: the data energy of a fully connected weight."""
    matrix = np.asarray(matrix, np.float64)
    return _eig_spectrum(matrix.T @ regularized(moment) @ matrix)


def channel_roots(moments: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per group, (S^(1/2), S^(-1/2)) of the regularised input-channel second moment S."""
    roots = []
    for moment in moments:
        values, vectors = np.linalg.eigh(regularized(moment))
        values = np.clip(values, values.max() * 1e-12, None) if values.size else values
        roots.append(
            ((vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T)
        )
    return roots


def whiten_input_channels(
    weight: np.ndarray, roots: list[tuple[np.ndarray, np.ndarray]], groups: int = 1
) -> np.ndarray:
    """W S^(1/2) along the input-channel axis, group by group (float64)."""
    return np.concatenate(
        [
            np.einsum("nc...,cd->nd...", block, half)
            for block, (half, _) in zip(_blocks(weight, groups), roots)
        ]
    )


def unwhiten_first(
    first: np.ndarray, roots: list[tuple[np.ndarray, np.ndarray]], groups: int = 1
) -> np.ndarray:
    """The first 1x1 conv's weight (R*g, C/g, 1...) fitted to whitened inputs, made to read the
    raw ones: F S^(-1/2), group by group."""
    parts = []
    for block, (_, inverse) in zip(np.split(np.asarray(first, np.float64), groups), roots):
        flat = block.reshape(len(block), -1) @ inverse
        parts.append(flat.reshape(block.shape))
    return _f32(parts)


def least_squares(
    gram: np.ndarray, cross: np.ndarray, ridge: float = RIDGE, prior: np.ndarray | None = None
) -> np.ndarray:
    """argmin_A ||Y - Z A||^2 + lambda ||A - A0||^2 from gram = Z^T Z and cross = Z^T Y, with
    A0 = `prior` (zero when None) and lambda = ridge * mean(diag(gram))."""
    gram, cross = np.asarray(gram, np.float64), np.asarray(cross, np.float64)
    if prior is not None:
        cross = cross + _ridge_weight(gram, ridge) * np.asarray(prior, np.float64)
    return np.linalg.solve(regularized(gram, ridge), cross)


def residual(
    gram: np.ndarray, cross: np.ndarray, target_power: float, solution: np.ndarray
) -> float:
    """||Y - Z A||^2 from the accumulated statistics (no activations kept)."""
    value = target_power - 2 * np.sum(solution * cross) + np.sum(solution * (gram @ solution))
    return max(float(value), 0.0)


def cross_validated_ridge(problems, priors=None) -> tuple[float, float]:
    """The ridge (from RIDGES, PRIOR_RIDGES with `priors`) with the least two-fold held-out
    residual, and that residual.

    `problems`: per independent least-squares problem (a group of a conv), its two folds as
    (gram, cross, target_power); `priors`: per problem, the solution to shrink towards. A
    refit with more unknowns than the calibration data pins down (an 8x8 conv over an 8x8 map
    has one output position per image) fits noise in the sample; the held-out fold shows it
    and picks a stronger ridge."""
    priors = [None] * len(problems) if priors is None else list(priors)
    best = None
    for ridge in RIDGES if all(p is None for p in priors) else PRIOR_RIDGES:
        held = 0.0
        for folds, prior in zip(problems, priors):
            for train, test in ((folds[0], folds[1]), (folds[1], folds[0])):
                held += residual(*test, least_squares(train[0], train[1], ridge, prior))
        if best is None or held < best[1]:
            best = (ridge, held)
    return best
