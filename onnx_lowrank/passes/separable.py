"""Spatial separable pass (Jaderberg scheme 2): Conv kHxkW -> Conv kHx1 (K maps) -> Conv 1xkW.

The vertical conv carries the height strides/dilations/pads, the horizontal one the width's and
the bias. Grouped convs are factored per group (both stages keep `group`). Skipped: 1-D convs
and kernels with a side of 1 (nothing to separate), depthwise convs."""

from __future__ import annotations

import numpy as np

from ..cost import ConvShape
from ..decompose.metrics import whitened_separable, whitened_separable_spectrum
from ..decompose.svd import SpatialSeparable, separable_spectrum, spatial_separable
from ..graph import ConvGeometry
from .base import ConvLayer, ConvPass, stage_geometry


class SeparablePass(ConvPass):
    method = "separable"

    def skip_reason(self, layer: ConvLayer) -> str | None:
        if len(layer.kernel) != 2:
            return "separable needs a 2-D conv (1-D convs go through channel-svd or tucker2)"
        if min(layer.kernel) < 2:
            return f"kernel {layer.kernel[0]}x{layer.kernel[1]} has nothing to separate"
        return super().skip_reason(layer)

    def full_rank(self, layer: ConvLayer) -> tuple[int, ...]:
        g = layer.group
        return (
            min(
                layer.in_channels // g * layer.kernel[0], layer.out_channels // g * layer.kernel[1]
            ),
        )

    def spectra(self, layer: ConvLayer) -> list[list[np.ndarray]]:
        if layer.moments is not None:
            return [whitened_separable_spectrum(layer.weight, layer.moments, layer.group)]
        return [separable_spectrum(layer.weight, layer.group)]

    def whitening(self, layer: ConvLayer) -> ConvGeometry:
        """The vertical conv's input patches (C/g * kH per group)."""
        return stage_geometry(2, layer.group, 0, layer)

    def layout(self, layer: ConvLayer, rank: tuple[int, ...]) -> list[ConvShape]:
        (k,), g = rank, layer.group
        kh, kw = layer.kernel
        return [
            ConvShape((k * g, layer.in_channels // g, kh, 1), stage_geometry(2, g, 0, layer)),
            ConvShape((layer.out_channels, k, 1, kw), stage_geometry(2, g, 1, layer)),
        ]

    def decompose(self, layer: ConvLayer, rank: tuple[int, ...]) -> SpatialSeparable:
        if layer.moments is not None:
            return whitened_separable(layer.weight, rank[0], layer.moments, layer.group)
        return spatial_separable(layer.weight, rank[0], layer.group)

    def weights(self, factors: SpatialSeparable) -> list[np.ndarray]:
        return [factors.vertical, factors.horizontal]
