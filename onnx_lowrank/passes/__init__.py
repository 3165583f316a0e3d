"""Graph rewrites, one per method, built on onnx-graphsurgeon."""

from __future__ import annotations

from .base import ConvPass
from .cp import CPPass
from .separable import SeparablePass
from .svd import ChannelSVDPass, Tucker2Pass

CONV_PASSES: dict[str, type[ConvPass]] = {
    "separable": SeparablePass,
    "channel-svd": ChannelSVDPass,
    "tucker2": Tucker2Pass,
    "cp": CPPass,
}
