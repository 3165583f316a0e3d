"""CP four-conv chain pass (Lebedev et al. 2015): Conv kHxkW becomes
Conv 1x1 (C -> R), Conv kHx1 depthwise (R), Conv 1xkW depthwise (R), Conv 1x1 (R -> N, bias).

The depthwise convs carry the strides, dilations and pads (height on the first, width on the
second): a bias-free 1x1 conv commutes with zero padding. Targets: --rank, --max-error (the
smallest rank whose fit meets it, by a doubling-then-bisection search) and --speedup; --energy has
no meaning for CP. Skipped: 1-D and grouped convs, and depthwise ones."""

from __future__ import annotations

import hashlib

import numpy as np

from ..config import RankSpec
from ..cost import ConvShape
from ..decompose.cp import CPFactors, cp_decompose, cp_rank_for_error
from .base import ConvLayer, ConvPass, _round_up, stage_geometry

_FITS: dict[tuple, CPFactors] = {}  # this process's CP fits, oldest dropped first


class CPPass(ConvPass):
    method = "cp"
    pointwise_first = True

    def skip_reason(self, layer: ConvLayer) -> str | None:
        if len(layer.kernel) != 2:
            return "cp needs a 2-D conv"
        if layer.group > 1 and layer.group != layer.in_channels:
            return f"grouped conv (group={layer.group}): cp factors group=1 convs"
        return super().skip_reason(layer)

    def full_rank(self, layer: ConvLayer) -> tuple[int, ...]:
        """Not a true CP rank (none is known), but the rank where the chain stops paying."""
        n, c, kh, kw = layer.weight.shape
        return (max(1, n * c * kh * kw // (n + c + kh + kw)),)

    def choose_rank(self, layer: ConvLayer, spec: RankSpec, multiple: int) -> tuple[int, ...]:
        if spec.kind == "rank":  # CP has no full rank to clip to; "no gain" guards the cost
            return (int(spec.value),)
        if spec.kind == "error":
            rank = cp_rank_for_error(self.metric_weight(layer), spec.value, seed=self.seed)
            return (_round_up(rank, multiple) if rank >= multiple else rank,)
        return super().choose_rank(layer, spec, multiple)

    def layout(self, layer: ConvLayer, rank: tuple[int, ...]) -> list[ConvShape]:
        (r,) = rank
        kh, kw = layer.kernel
        return [
            ConvShape((r, layer.in_channels, 1, 1), stage_geometry(2)),
            ConvShape((r, 1, kh, 1), stage_geometry(2, r, 0, layer)),
            ConvShape((r, 1, 1, kw), stage_geometry(2, r, 1, layer)),
            ConvShape((layer.out_channels, r, 1, 1), stage_geometry(2)),
        ]

    def decompose(self, layer: ConvLayer, rank: tuple[int, ...]) -> CPFactors:
        # the planner builds several plans from the same layers: fit each (weight, rank) once
        key = (
            hashlib.sha1(np.ascontiguousarray(layer.weight).tobytes()).hexdigest(),
            layer.weight.shape,
            rank[0],
            self.seed,
        )
        if key not in _FITS:
            if len(_FITS) >= 64:
                _FITS.pop(next(iter(_FITS)))
            _FITS[key] = cp_decompose(layer.weight, rank[0], seed=self.seed)
        return _FITS[key]

    def weights(self, factors: CPFactors) -> list[np.ndarray]:
        return [factors.first, factors.vertical, factors.horizontal, factors.last]
