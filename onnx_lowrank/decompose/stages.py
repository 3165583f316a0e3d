"""The op chain a clustered factorization becomes, as plain records for the passes to emit.

A pass turns a list of `Stage` records into ONNX nodes in order, one node per record, with no
linear algebra: a ``"conv"`` record is a ``Conv`` with the given weight (ONNX layout
``(O, I/group, kH, kW)``), ``group`` and optional bias; ``spatial=True`` marks the one conv of
the chain that carries the original node's strides, dilations and pads (the others are 1x1 convs
with unit strides and no padding). A ``"gather"`` record is ``Gather(axis=1, indices)``: output
channel ``i`` is input channel ``indices[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stage:
    """One node of a factored chain: a (grouped) Conv or a channel Gather."""

    kind: str  # "conv" | "gather"
    weight: np.ndarray | None = None  # conv: (O, I/group, kH, kW)
    group: int = 1
    spatial: bool = False  # conv: carries the original strides/dilations/pads
    bias: np.ndarray | None = None  # conv: (O,), already in this conv's output order
    indices: np.ndarray | None = None  # gather: (channels,) int64, axis 1

    @staticmethod
    def conv(
        weight: np.ndarray, group: int = 1, *, spatial: bool = False, bias: np.ndarray | None = None
    ) -> Stage:
        """A Conv record."""
        return Stage("conv", weight=weight, group=group, spatial=spatial, bias=bias)

    @staticmethod
    def gather(indices: np.ndarray) -> Stage:
        """A Gather(axis=1) record."""
        return Stage("gather", indices=np.asarray(indices, dtype=np.int64))


def is_identity(order: np.ndarray | None) -> bool:
    """True when a channel order is absent or leaves every channel in place."""
    return order is None or bool(np.array_equal(order, np.arange(len(order))))


def gather_unless_identity(indices: np.ndarray | None) -> list[Stage]:
    """A one-element list with the Gather, or an empty list when it would do nothing."""
    return [] if is_identity(indices) else [Stage.gather(indices)]


def inverse_permutation(order: np.ndarray) -> np.ndarray:
    """The permutation that undoes ``order``: ``x[order][inverse] == x``."""
    inverse = np.empty_like(np.asarray(order, dtype=np.int64))
    inverse[order] = np.arange(len(order))
    return inverse


def output_dtype(weight: np.ndarray) -> np.dtype:
    """The dtype factors are returned in: the weight's own float dtype, float32 otherwise."""
    dtype = np.asarray(weight).dtype
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float32)


def relative_error(weight: np.ndarray, approx: np.ndarray) -> float:
    """Frobenius ``||W - W~|| / ||W||`` in float64 (0 for an all-zero weight)."""
    weight = np.asarray(weight, dtype=np.float64)
    norm = np.linalg.norm(weight)
    if norm == 0.0:
        return float(np.linalg.norm(approx))
    return float(np.linalg.norm(weight - np.asarray(approx, dtype=np.float64)) / norm)
