"""onnx-lowrank: rewrite the convolutions of an ONNX model into faster low-rank op chains."""

from __future__ import annotations

from .api import inspect, optimize
from .config import Calibration, OptimizeConfig, Preprocess, RankSpec
from .errors import LowRankError
from .report import LayerRecord, Report

__all__ = [
    "Calibration",
    "LayerRecord",
    "LowRankError",
    "OptimizeConfig",
    "Preprocess",
    "RankSpec",
    "Report",
    "inspect",
    "optimize",
]
__version__ = "0.1.0"
