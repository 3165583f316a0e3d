"""Separable filter basis, "scheme 1" of Jaderberg, Vedaldi & Zisserman 2014 (after Rigamonti).

Each input channel ``c`` gets its own basis of ``M`` separable (rank-1) filters, and every
output filter's slice on that channel is a combination of them:
``W[n,c,:,:] ~ sum_m A[n,c,m] v[c,m,:] outer h[c,m,:]``. For one channel this is a rank-M CP of
the 3-way tensor ``W[:, c]`` of shape ``(N, kH, kW)``, fitted with the CP engine of cp.py
(SVD guess, ALS sweeps, Levenberg-Marquardt, degeneracy control, norms balanced over the three
factors). The chain is a ``kH x 1`` conv with ``group=C`` from ``C`` to ``C*M`` channels, a
``1 x kW`` depthwise conv on ``C*M`` channels and a 1x1 conv ``C*M -> N`` holding ``A``;
intermediate channel ``c*M + m`` carries filter ``m`` of input channel ``c``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_lowrank.decompose.cp import fit_tensor, relative_error


@dataclass(frozen=True)
class SeparableBasis:
    """Per-channel separable filter bases as the weights of the three-conv chain."""

    vertical: np.ndarray  # (C*M, 1, kH, 1)  depthwise-with-multiplier kx1, channel c*M+m
    horizontal: np.ndarray  # (C*M, 1, 1, kW)  depthwise 1xk
    mixing: np.ndarray  # (N, C*M, 1, 1)   1x1 holding A
    relative_error: float  # ||W - reconstruct()||_F / ||W||_F
    rank: int  # M, separable filters per input channel
    degenerate_channels: tuple[int, ...] = ()  # channels whose CP fit was flagged degenerate

    def reconstruct(self) -> np.ndarray:
        """The dense ``(N, C, kH, kW)`` kernel the chain computes."""
        n, kh, kw = self.mixing.shape[0], self.vertical.shape[2], self.horizontal.shape[3]
        per_filter = np.einsum(
            "nq,qy,qx->nqyx",
            self.mixing[:, :, 0, 0],
            self.vertical[:, 0, :, 0],
            self.horizontal[:, 0, 0, :],
        )
        return per_filter.reshape(n, -1, self.rank, kh, kw).sum(axis=2)


def separable_basis(
    weight: np.ndarray,
    rank: int,
    *,
    seed: int = 0,
    method: str = "nls",
    max_iter: int = 50,
    tol: float = 1e-7,
) -> SeparableBasis:
    """Rank-``rank`` separable basis per input channel of a ``(N, C, kH, kW)`` kernel."""
    weight = np.asarray(weight)
    if weight.ndim != 4:
        raise ValueError(f"Scheme 1 expects a 4-D kernel (N, C, kH, kW), got shape {weight.shape}.")
    if rank < 1:
        raise ValueError(f"Separable basis rank must be at least 1, got {rank}.")
    kernel = weight.astype(np.float64)
    n, channels, kh, kw = kernel.shape
    mixing = np.zeros((n, channels, rank))
    vertical = np.zeros((channels, rank, kh))
    horizontal = np.zeros((channels, rank, kw))
    degenerate = []
    for c in range(channels):
        fit = fit_tensor(kernel[:, c], rank, seed=seed, method=method, max_iter=max_iter, tol=tol)
        mixing[:, c], vertical[c], horizontal[c] = (
            fit.factors[0],
            fit.factors[1].T,
            fit.factors[2].T,
        )
        if fit.degenerate:
            degenerate.append(c)
    basis = SeparableBasis(
        vertical=vertical.reshape(channels * rank, 1, kh, 1).astype(np.float32),
        horizontal=horizontal.reshape(channels * rank, 1, 1, kw).astype(np.float32),
        mixing=mixing.reshape(n, channels * rank, 1, 1).astype(np.float32),
        relative_error=0.0,
        rank=rank,
        degenerate_channels=tuple(degenerate),
    )
    error = relative_error(kernel, basis.reconstruct())
    return SeparableBasis(**{**basis.__dict__, "relative_error": error})
