"""Channel SVD and Tucker-2 passes.

- channel-svd: Conv kxk (C -> K, the original geometry) then Conv 1x1 (K -> N, bias).
- tucker2: Conv 1x1 (C -> R1), Conv kxk (R1 -> R2, the original geometry), Conv 1x1 (R2 -> N,
  bias). A bias-free 1x1 commutes with zero padding, so the pads stay on the middle conv.
Both take 1-D and 2-D convs; grouped convs are factored per group (every stage keeps `group`)."""

from __future__ import annotations

import math

import numpy as np

from ..cost import ConvShape
from ..decompose.metrics import whitened_channel_spectrum, whitened_channel_svd
from ..decompose.svd import (
    ChannelSVD,
    Tucker2,
    channel_svd,
    channel_svd_spectrum,
    tucker2,
    tucker2_spectra,
)
from ..graph import ConvGeometry
from .base import ConvLayer, ConvPass, stage_geometry


class ChannelSVDPass(ConvPass):
    method = "channel-svd"

    def full_rank(self, layer: ConvLayer) -> tuple[int, ...]:
        g = layer.group
        return (min(layer.out_channels // g, layer.in_channels // g * math.prod(layer.kernel)),)

    def spectra(self, layer: ConvLayer) -> list[list[np.ndarray]]:
        if layer.moments is not None:
            return [whitened_channel_spectrum(layer.weight, layer.moments, layer.group)]
        return [channel_svd_spectrum(layer.weight, layer.group)]

    def whitening(self, layer: ConvLayer) -> ConvGeometry:
        return stage_geometry(len(layer.kernel), layer.group, None, layer)

    def layout(self, layer: ConvLayer, rank: tuple[int, ...]) -> list[ConvShape]:
        (k,), g, nd = rank, layer.group, len(layer.kernel)
        return [
            ConvShape(
                (k * g, layer.in_channels // g, *layer.kernel), stage_geometry(nd, g, None, layer)
            ),
            ConvShape((layer.out_channels, k, *(1,) * nd), stage_geometry(nd, g)),
        ]

    def decompose(self, layer: ConvLayer, rank: tuple[int, ...]) -> ChannelSVD:
        if layer.moments is not None:
            return whitened_channel_svd(layer.weight, rank[0], layer.moments, layer.group)
        return channel_svd(layer.weight, rank[0], layer.group)

    def weights(self, factors: ChannelSVD) -> list[np.ndarray]:
        return [factors.spatial, factors.pointwise]


class Tucker2Pass(ConvPass):
    method = "tucker2"
    two_ranks = True
    pointwise_first = True

    def skip_reason(self, layer: ConvLayer) -> str | None:
        if math.prod(layer.kernel) == 1:
            return "1x1 kernel: tucker2 would only add a stage (use channel-svd)"
        return super().skip_reason(layer)

    def full_rank(self, layer: ConvLayer) -> tuple[int, ...]:
        g = layer.group
        return layer.in_channels // g, layer.out_channels // g

    def spectra(self, layer: ConvLayer) -> list[list[np.ndarray]]:
        pairs = tucker2_spectra(self.metric_weight(layer), layer.group)
        return [[p[0] for p in pairs], [p[1] for p in pairs]]

    def layout(self, layer: ConvLayer, rank: tuple[int, ...]) -> list[ConvShape]:
        (r_in, r_out), g, nd = rank, layer.group, len(layer.kernel)
        ones = (1,) * nd
        return [
            ConvShape((r_in * g, layer.in_channels // g, *ones), stage_geometry(nd, g)),
            ConvShape((r_out * g, r_in, *layer.kernel), stage_geometry(nd, g, None, layer)),
            ConvShape((layer.out_channels, r_out, *ones), stage_geometry(nd, g)),
        ]

    def decompose(self, layer: ConvLayer, rank: tuple[int, ...]) -> Tucker2:
        return tucker2(layer.weight, rank, layer.group)

    def weights(self, factors: Tucker2) -> list[np.ndarray]:
        return [factors.first, factors.core, factors.last]
