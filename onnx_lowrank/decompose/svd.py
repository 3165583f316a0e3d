"""SVD-family factorizations of conv and fully connected weights (pure numpy).

- Spatial separable, Jaderberg et al. 2014 scheme 2: unfold W[n,c,y,x] as M[(c,y),(n,x)] and
  truncate its SVD to rank K: W ~ sum_k H[n,k,x] V[k,c,y] (a kHx1 conv to K maps, then 1xkW).
- Channel SVD: unfold W as N x (C*kH*kW), rank K: a kHxkW conv to K maps, then a 1x1 conv.
- Tucker-2 (Kim et al. 2016; Denton's biclustering with one cluster): HOSVD factors of the
  input- and output-channel unfoldings, refined by HOOI sweeps: 1x1 (C->R1), core (R1->R2), 1x1.
- Fully connected SVD: W (in x out) ~ L R with L (in x K), R (K x out), singular values split
  evenly between the two.
Grouped convs (weight (N, C/g, ...)) are factored group by group and stacked along the output
axis, so every stage becomes a grouped conv with the same `group`.
All work is done in float64; factors come back as float32, in ONNX Conv weight layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ChannelSVD",
    "LowRankMatrix",
    "SpatialSeparable",
    "Tucker2",
    "channel_svd",
    "channel_svd_spectrum",
    "low_rank_matrix",
    "matrix_spectrum",
    "relative_error",
    "separable_spectrum",
    "spatial_separable",
    "tucker2",
    "tucker2_spectra",
]


def relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    """||exact - approx||_F / ||exact||_F (0 for an all-zero exact)."""
    exact64 = np.asarray(exact, np.float64)
    norm = np.linalg.norm(exact64)
    diff = np.linalg.norm(exact64 - np.asarray(approx, np.float64))
    return float(diff / norm) if norm > 0 else float(diff)


def _split_svd(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank-`rank` factors A (m x K), B (K x n) of `matrix` with sqrt(S) on each side."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    rank = min(rank, s.size)
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def _blocks(weight: np.ndarray, groups: int) -> list[np.ndarray]:
    if weight.shape[0] % groups:
        raise ValueError(f"{weight.shape[0]} output channels do not split into {groups} groups")
    return [b.astype(np.float64) for b in np.split(weight, groups, axis=0)]


def _separable_matrix(block: np.ndarray) -> np.ndarray:
    n, c, kh, kw = block.shape
    return block.transpose(1, 2, 0, 3).reshape(c * kh, n * kw)


@dataclass(frozen=True)
class SpatialSeparable:
    """Jaderberg scheme 2: vertical (K*g, C/g, kH, 1) then horizontal (N, K, 1, kW), group g."""

    vertical: np.ndarray
    horizontal: np.ndarray
    groups: int = 1

    @property
    def rank(self) -> int:
        return self.vertical.shape[0] // self.groups

    def reconstruct(self) -> np.ndarray:
        """The dense (N, C/g, kH, kW) weight this chain computes."""
        vs = np.split(self.vertical.astype(np.float64), self.groups)
        hs = np.split(self.horizontal.astype(np.float64), self.groups)
        return np.concatenate(
            [np.einsum("nkx,kcy->ncyx", h[:, :, 0, :], v[:, :, :, 0]) for v, h in zip(vs, hs)]
        )


def separable_spectrum(weight: np.ndarray, groups: int = 1) -> list[np.ndarray]:
    """Singular values of each group's (C*kH) x (N*kW) unfolding."""
    return [np.linalg.svd(_separable_matrix(b), compute_uv=False) for b in _blocks(weight, groups)]


def spatial_separable(weight: np.ndarray, rank: int, groups: int = 1) -> SpatialSeparable:
    """Best rank-`rank` kHx1 / 1xkW factorization (Frobenius-optimal per group)."""
    verticals, horizontals = [], []
    for block in _blocks(weight, groups):
        n, c, kh, kw = block.shape
        a, b = _split_svd(_separable_matrix(block), rank)
        a, b = _pad_rank(a, b, rank)
        verticals.append(a.T.reshape(rank, c, kh, 1))
        horizontals.append(b.reshape(rank, n, kw).transpose(1, 0, 2).reshape(n, rank, 1, kw))
    return SpatialSeparable(_f32(verticals), _f32(horizontals), groups)


@dataclass(frozen=True)
class ChannelSVD:
    """A full-kernel conv to K maps (K*g, C/g, *k) then a 1x1 conv (N, K, 1...), group g."""

    spatial: np.ndarray
    pointwise: np.ndarray
    groups: int = 1

    @property
    def rank(self) -> int:
        return self.spatial.shape[0] // self.groups

    def reconstruct(self) -> np.ndarray:
        """The dense (N, C/g, *k) weight this chain computes."""
        ss = np.split(self.spatial.astype(np.float64), self.groups)
        ps = np.split(self.pointwise.astype(np.float64), self.groups)
        return np.concatenate(
            [np.tensordot(p.reshape(p.shape[0], -1), s, axes=1) for s, p in zip(ss, ps)]
        )


def channel_svd_spectrum(weight: np.ndarray, groups: int = 1) -> list[np.ndarray]:
    """Singular values of each group's N/g x (C/g * prod(k)) unfolding."""
    return [
        np.linalg.svd(b.reshape(b.shape[0], -1), compute_uv=False) for b in _blocks(weight, groups)
    ]


def channel_svd(weight: np.ndarray, rank: int, groups: int = 1) -> ChannelSVD:
    """Best rank-`rank` factorization over output channels (Frobenius-optimal per group)."""
    spatials, pointwises = [], []
    ones = (1,) * (weight.ndim - 2)
    for block in _blocks(weight, groups):
        a, b = _pad_rank(*_split_svd(block.reshape(block.shape[0], -1), rank), rank)
        spatials.append(b.reshape(rank, *block.shape[1:]))
        pointwises.append(a.reshape(block.shape[0], rank, *ones))
    return ChannelSVD(_f32(spatials), _f32(pointwises), groups)


@dataclass(frozen=True)
class Tucker2:
    """1x1 (R1*g, C/g) -> core (R2*g, R1, *k) -> 1x1 (N, R2), every stage with group g."""

    first: np.ndarray
    core: np.ndarray
    last: np.ndarray
    groups: int = 1

    @property
    def ranks(self) -> tuple[int, int]:
        return self.first.shape[0] // self.groups, self.core.shape[0] // self.groups

    def reconstruct(self) -> np.ndarray:
        """The dense (N, C/g, *k) weight this chain computes."""
        out = []
        for f, c, la in zip(
            *(
                np.split(a.astype(np.float64), self.groups)
                for a in (self.first, self.core, self.last)
            )
        ):
            f2, l2 = f.reshape(f.shape[0], -1), la.reshape(la.shape[0], -1)
            out.append(np.einsum("nr,rs...,sc->nc...", l2, c, f2, optimize=True))
        return np.concatenate(out)


def _mode_unfold(block: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(block, mode, 0).reshape(block.shape[mode], -1)


def tucker2_spectra(weight: np.ndarray, groups: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per group, singular values of the input-channel and output-channel unfoldings."""
    return [
        (
            np.linalg.svd(_mode_unfold(b, 1), compute_uv=False),
            np.linalg.svd(_mode_unfold(b, 0), compute_uv=False),
        )
        for b in _blocks(weight, groups)
    ]


def _leading(matrix: np.ndarray, rank: int) -> np.ndarray:
    u = np.linalg.svd(matrix, full_matrices=False)[0][:, :rank]
    return np.pad(u, ((0, 0), (0, rank - u.shape[1])))


def tucker2(
    weight: np.ndarray, ranks: tuple[int, int], groups: int = 1, sweeps: int = 2
) -> Tucker2:
    """Tucker-2 with input rank R1 and output rank R2: HOSVD start, then `sweeps` HOOI sweeps."""
    r_in, r_out = ranks
    firsts, cores, lasts = [], [], []
    ones = (1,) * (weight.ndim - 2)
    for block in _blocks(weight, groups):
        u_in, u_out = (
            _leading(_mode_unfold(block, 1), r_in),
            _leading(_mode_unfold(block, 0), r_out),
        )
        for _ in range(sweeps):
            u_in = _leading(_mode_unfold(np.tensordot(u_out, block, axes=(0, 0)), 1), r_in)
            u_out = _leading(
                _mode_unfold(np.moveaxis(np.tensordot(block, u_in, axes=(1, 0)), -1, 1), 0), r_out
            )
        core = np.einsum("nc...,ns,cr->sr...", block, u_out, u_in, optimize=True)
        firsts.append(u_in.T.reshape(r_in, block.shape[1], *ones))
        cores.append(core)
        lasts.append(u_out.reshape(block.shape[0], r_out, *ones))
    return Tucker2(_f32(firsts), _f32(cores), _f32(lasts), groups)


@dataclass(frozen=True)
class LowRankMatrix:
    """W (in x out) ~ left (in x K) @ right (K x out)."""

    left: np.ndarray
    right: np.ndarray

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def reconstruct(self) -> np.ndarray:
        return self.left.astype(np.float64) @ self.right.astype(np.float64)


def matrix_spectrum(matrix: np.ndarray) -> np.ndarray:
    """Singular values of a 2-D weight."""
    return np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)


def low_rank_matrix(matrix: np.ndarray, rank: int) -> LowRankMatrix:
    """Best rank-`rank` factorization of a 2-D weight."""
    a, b = _pad_rank(*_split_svd(np.asarray(matrix, np.float64), rank), rank)
    return LowRankMatrix(a.astype(np.float32), b.astype(np.float32))


def _pad_rank(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad factors to exactly `rank` when it exceeds the matrix rank (forced ranks)."""
    extra = rank - a.shape[1]
    if extra > 0:
        a = np.pad(a, ((0, 0), (0, extra)))
        b = np.pad(b, ((0, extra), (0, 0)))
    return a, b


def _f32(parts: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
