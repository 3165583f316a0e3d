"""Monochromatic approximation of a first conv layer (Denton et al. 2014, section 3.3).

For each filter ``f`` the ``C x (kH*kW)`` matrix ``W_f`` has the rank-1 SVD ``u_f s_f v_f^T``;
the colour lines ``u_f`` (sign-free) are clustered into ``C'`` equal-size clusters with balanced,
sign-invariant k-means, and every filter of cluster ``c`` reads only one colour ``U_c``:
``W_f ~ U_c (U_c^T W_f)``. Given the clusters, the unit colour maximising the kept energy
``sum_f ||U_c^T W_f||^2`` is the top eigenvector of ``sum_{f in c} W_f W_f^T``, and given the
colour, ``U_c^T W_f`` is the least-squares spatial filter; a few balanced reassignment rounds
(each filter to the colour that keeps most of its energy) then alternate with these updates,
never increasing the error. ONNX: ``Conv(1x1, C -> C')`` with rows ``U_c``, a grouped
``Conv(kH x kW, group=C')`` whose group ``c`` makes the filters of cluster ``c``, and a
``Gather`` back to the original filter order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from onnx_lowrank.decompose.cluster import balanced_assignment, balanced_kmeans
from onnx_lowrank.decompose.stages import (
    Stage,
    gather_unless_identity,
    inverse_permutation,
    output_dtype,
    relative_error,
)

_REFINE_ROUNDS = 10


@dataclass(frozen=True)
class Monochromatic:
    """A conv as colour projection + one-colour-per-filter grouped conv."""

    colors: np.ndarray  # (C', C, 1, 1): 1x1 conv C -> C', unit colour lines as rows
    spatial: np.ndarray  # (N, 1, kH, kW): grouped conv, group=C', channel j in cluster order
    order: np.ndarray  # (N,) int64: grouped-conv output channel j is original filter order[j]
    relative_error: float

    @property
    def n_colors(self) -> int:
        """C', the number of intermediate colour channels."""
        return self.colors.shape[0]

    def reconstruct(self) -> np.ndarray:
        """The dense (N, C, kH, kW) weight in the original filter order."""
        per_color = self.spatial.shape[0] // self.n_colors
        cluster = np.arange(self.spatial.shape[0]) // per_color
        colour = self.colors[cluster, :, 0, 0].astype(np.float64)  # (N, C) in cluster order
        dense = np.einsum("jc,jyx->jcyx", colour, self.spatial[:, 0].astype(np.float64))
        out = np.empty_like(dense)
        out[self.order] = dense
        return out.astype(self.spatial.dtype)

    def stages(self, bias: np.ndarray | None = None) -> list[Stage]:
        """The chain to emit: 1x1 conv, grouped spatial conv (with the bias), Gather if needed."""
        return [
            Stage.conv(self.colors, 1),
            Stage.conv(
                self.spatial,
                self.n_colors,
                spatial=True,
                bias=None if bias is None else np.asarray(bias)[self.order],
            ),
            *gather_unless_identity(inverse_permutation(self.order)),
        ]


def nearest_divisor(n: int, c: int) -> int:
    """The divisor of ``n`` nearest to ``c`` (ties: the larger)."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - c), -d))


def monochromatic(weight: np.ndarray, n_colors: int, *, seed: int = 0) -> Monochromatic:
    """Denton's monochromatic approximation of a dense (N, C, kH, kW) conv weight with C' colours.

    ``n_colors`` must divide N (see `nearest_divisor`). Factors keep the weight's float dtype.
    """
    weight = np.asarray(weight)
    if weight.ndim != 4:
        raise ValueError(f"weight must be 4-D (N, C, kH, kW), got shape {weight.shape}.")
    n_filters, channels, kh, kw = weight.shape
    if n_colors < 1 or n_filters % n_colors != 0:
        raise ValueError(f"n_colors={n_colors} must be a positive divisor of N={n_filters}.")
    filters = weight.reshape(n_filters, channels, kh * kw).astype(np.float64)
    labels, colors = _cluster_colours(filters, n_colors, seed)
    order = np.argsort(labels, kind="stable")
    spatial = np.einsum("jc,jct->jt", colors[labels[order]], filters[order])
    dtype = output_dtype(weight)
    result = Monochromatic(
        colors=colors.reshape(n_colors, channels, 1, 1).astype(dtype),
        spatial=spatial.reshape(n_filters, 1, kh, kw).astype(dtype),
        order=order.astype(np.int64),
        relative_error=0.0,
    )
    return replace(result, relative_error=relative_error(weight, result.reconstruct()))


def _cluster_colours(filters: np.ndarray, n_colors: int, seed: int):
    """Balanced labels (N,) and unit colours (C', C) for the filters (N, C, T)."""
    lines = np.linalg.svd(filters, full_matrices=False)[0][:, :, 0]  # (N, C) colour lines
    labels = balanced_kmeans(lines, n_colors, seed=seed, sign_invariant=True).labels
    colors = _best_colours(filters, labels, n_colors)
    energy = (filters**2).sum((1, 2))
    kept = _kept_energy(filters, colors)
    for _ in range(_REFINE_ROUNDS):
        new_labels = balanced_assignment(energy[:, None] - kept)
        if np.array_equal(new_labels, labels):
            break
        new_colors = _best_colours(filters, new_labels, n_colors)
        new_kept = _kept_energy(filters, new_colors)
        rows = np.arange(len(filters))
        if new_kept[rows, new_labels].sum() <= kept[rows, labels].sum():
            break
        labels, colors, kept = new_labels, new_colors, new_kept
    return labels, colors


def _best_colours(filters: np.ndarray, labels: np.ndarray, n_colors: int) -> np.ndarray:
    """Per cluster, the unit colour keeping most energy: top eigenvector of sum W_f W_f^T."""
    colors = []
    for c in range(n_colors):
        members = filters[labels == c]
        scatter = np.einsum("fct,fdt->cd", members, members)
        colour = np.linalg.eigh(scatter)[1][:, -1]
        # Fix the sign so the result does not depend on the eigensolver's choice.
        colors.append(colour if colour[np.argmax(np.abs(colour))] >= 0 else -colour)
    return np.stack(colors)


def _kept_energy(filters: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """(N, C') energy ``||U_c^T W_f||^2`` each colour keeps of each filter."""
    return (np.einsum("kc,fct->fkt", colors, filters) ** 2).sum(2)
