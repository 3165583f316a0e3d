"""Graph rewrites, one per method, built on onnx-graphsurgeon."""

from __future__ import annotations

from .base import ConvPass
from .bicluster import BiclusterOuterPass, BiclusterSVDPass
from .cp import CPPass
from .monochromatic import MonochromaticPass
from .separable import SeparablePass
from .separable_basis import SeparableBasisPass
from .svd import ChannelSVDPass, Tucker2Pass

CONV_PASSES: dict[str, type[ConvPass]] = {
    "separable": SeparablePass,
    "channel-svd": ChannelSVDPass,
    "tucker2": Tucker2Pass,
    "cp": CPPass,
    "separable-basis": SeparableBasisPass,
    "monochromatic": MonochromaticPass,
    "bicluster-svd": BiclusterSVDPass,
    "bicluster-outer": BiclusterOuterPass,
}
