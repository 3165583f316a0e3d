"""Separable filter basis pass (Jaderberg et al. 2014, scheme 1): Conv kHxkW becomes
Conv kHx1 (group=C, C -> C*M), Conv 1xkW depthwise (C*M), Conv 1x1 (C*M -> N, bias).

`--rank M` is the number of separable filters per input channel; M = kH*kW is exact (the
elementary filters span every kH x kW slice). The vertical conv carries the height strides,
dilations and pads, the depthwise one the width's. Skipped: 1-D, grouped and depthwise convs,
and kernels with a side of 1."""

from __future__ import annotations

import numpy as np

from ..config import RankSpec
from ..cost import ConvShape
from ..decompose.separable_basis import SeparableBasis, separable_basis
from .base import ConvLayer, ConvPass, stage_geometry

SMALL_FIT = 20_000  # kernel entries x rank under which the per-channel fits run to convergence


class SeparableBasisPass(ConvPass):
    method = "separable-basis"

    def skip_reason(self, layer: ConvLayer) -> str | None:
        if len(layer.kernel) != 2 or min(layer.kernel) < 2:
            return "separable-basis needs a 2-D kernel with both sides >= 2"
        if layer.group > 1:
            return f"grouped conv (group={layer.group}): separable-basis factors group=1 convs"
        return None

    def full_rank(self, layer: ConvLayer) -> tuple[int, ...]:
        kh, kw = layer.kernel
        return (min(kh * kw, layer.out_channels * min(kh, kw)),)

    def choose_rank(self, layer: ConvLayer, spec: RankSpec, multiple: int) -> tuple[int, ...]:
        if spec.kind != "error":
            return super().choose_rank(layer, spec, multiple)
        lo, hi = 1, self.full_rank(layer)[0]  # the smallest M meeting the error (bisection)
        while lo < hi:
            mid = (lo + hi) // 2
            fit = separable_basis(layer.weight, mid, seed=self.seed)
            lo, hi = (lo, mid) if fit.relative_error <= spec.value else (mid + 1, hi)
        return (lo,)

    def layout(self, layer: ConvLayer, rank: tuple[int, ...]) -> list[ConvShape]:
        (m,), c = rank, layer.in_channels
        kh, kw = layer.kernel
        return [
            ConvShape((c * m, 1, kh, 1), stage_geometry(2, c, 0, layer)),
            ConvShape((c * m, 1, 1, kw), stage_geometry(2, c * m, 1, layer)),
            ConvShape((layer.out_channels, c * m, 1, 1), stage_geometry(2)),
        ]

    def decompose(self, layer: ConvLayer, rank: tuple[int, ...]) -> SeparableBasis:
        kh, kw = layer.kernel
        if rank[0] >= kh * kw:  # the elementary filters: exact, and no fit needed
            return _elementary_basis(layer.weight, rank[0])
        if layer.weight.size * rank[0] <= SMALL_FIT:  # small: converge fully, it costs little
            return separable_basis(layer.weight, rank[0], seed=self.seed, max_iter=300, tol=1e-12)
        return separable_basis(layer.weight, rank[0], seed=self.seed)

    def weights(self, factors: SeparableBasis) -> list[np.ndarray]:
        return [factors.vertical, factors.horizontal, factors.mixing]


def _elementary_basis(weight: np.ndarray, rank: int) -> SeparableBasis:
    """Filter m = y*kW + x of every channel is the unit tap (y, x); the mixing weights are the
    kernel itself (extra filters beyond kH*kW get zero weight)."""
    n, c, kh, kw = weight.shape
    taps = np.arange(rank)
    vertical = np.zeros((c, rank, kh), weight.dtype)
    horizontal = np.zeros((c, rank, kw), weight.dtype)
    real = taps < kh * kw
    vertical[:, taps[real], taps[real] // kw] = 1
    horizontal[:, taps[real], taps[real] % kw] = 1
    mixing = np.zeros((n, c, rank), weight.dtype)
    mixing[:, :, : kh * kw] = weight.reshape(n, c, kh * kw)
    return SeparableBasis(
        vertical.reshape(c * rank, 1, kh, 1),
        horizontal.reshape(c * rank, 1, 1, kw),
        mixing.reshape(n, c * rank, 1, 1),
        0.0,
        rank,
    )
