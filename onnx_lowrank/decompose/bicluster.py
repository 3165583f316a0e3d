"""Biclustered low-rank approximations of a conv weight (Denton et al. 2014, section 3.4).

Input channels are clustered into G equal groups (rows of ``W`` unfolded ``C x (kH*kW*N)``) and
output channels into H equal groups (columns of ``W`` unfolded ``(C*kH*kW) x N``) with
balanced, sign-invariant k-means on unit-normalised rows (channels on one line through the
origin fit one low-rank block). Each of the G*H blocks ``W_gh`` (N/H x C/G x kH x kW) is then
  * SVD (Tucker-2, ranks K1, K2): ``W_gh ~ B x core x A`` with A (C/G x K1) and B (N/H x K2) the
    leading singular vectors of the input- and output-channel unfoldings, refined by HOOI sweeps,
    and ``core = B^T W_gh A``; exact at K1 = C/G, K2 = N/H;
  * outer product (CP, rank K): ``W_gh ~ sum_k a_k o b_k o c_k`` over (C/G, kH*kW, N/H), fitted
    greedily one rank-1 term at a time by ALS on the residual, then refined jointly by ALS;
    at the full rank ``min(C/G*T, T*N/H, C/G*N/H)`` the exact slice-wise decomposition is used.
ONNX chain (`stages()`): Gather(in_order), 1x1 conv group=G, spatial conv (group=G*H for SVD,
depthwise for outer) with the original strides/dilations/pads, Gather(mid_order), 1x1 conv
group=H with the bias, Gather back to the original filter order. Stage-1/2 channels run in
(g, h, k) order; stage 3 needs (h, g, k), hence ``mid_order`` (None when G or H is 1). A Gather
whose indices are the identity is left out of the chain.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from onnx_lowrank.decompose.cluster import balanced_kmeans
from onnx_lowrank.decompose.stages import (
    Stage,
    gather_unless_identity,
    inverse_permutation,
    output_dtype,
    relative_error,
)

_HOOI_SWEEPS = 2
_RANK1_ALS_ITERS = 50
_TOL = 1e-12


@dataclass(frozen=True)
class BiclusterSVD:
    """Biclustered Tucker-2: per block 1x1 (C/G -> K1), kHxkW (K1 -> K2), 1x1 (K2 -> N/H)."""

    input_factors: np.ndarray  # (G*H*K1, C/G, 1, 1), rows in (g, h, k1) order; conv group=G
    core: np.ndarray  # (G*H*K2, K1, kH, kW), rows in (g, h, k2) order; conv group=G*H
    output_factors: np.ndarray  # (N, G*K2, 1, 1), inputs in (g, k2) order; conv group=H
    in_order: np.ndarray  # (C,): stage-1 input channel i is original input channel in_order[i]
    mid_order: np.ndarray | None  # (G*H*K2,): stage-3 input i is stage-2 output mid_order[i]
    out_order: np.ndarray  # (N,): stage-3 output channel j is original filter out_order[j]
    groups: tuple[int, int]  # (G, H)
    ranks: tuple[int, int]  # (K1, K2) after clipping
    relative_error: float

    def reconstruct(self) -> np.ndarray:
        """The dense (N, C, kH, kW) weight in the original channel orders."""
        g, h = self.groups
        k1, k2 = self.ranks
        n, kh, kw = self.output_factors.shape[0], *self.core.shape[2:]
        a = self.input_factors.astype(np.float64).reshape(g, h, k1, -1)
        core = self.core.astype(np.float64).reshape(g, h, k2, k1, kh, kw)
        b = self.output_factors.astype(np.float64).reshape(h, n // h, g, k2)
        blocks = np.einsum("hngq,ghqpyx,ghpc->ghncyx", b, core, a, optimize=True)
        dense = _assemble(blocks, self.in_order, self.out_order)
        return dense.astype(self.core.dtype)

    def stages(self, bias: np.ndarray | None = None) -> list[Stage]:
        """The chain to emit, in order (see the module docstring)."""
        g, h = self.groups
        middle = Stage.conv(self.core, g * h, spatial=True)
        return _chain(self, middle, bias)


@dataclass(frozen=True)
class BiclusterOuter:
    """Biclustered CP: per block 1x1 (C/G -> K), depthwise kHxkW, 1x1 (K -> N/H)."""

    input_factors: np.ndarray  # (G*H*K, C/G, 1, 1), rows in (g, h, k) order; conv group=G
    spatial_factors: np.ndarray  # (G*H*K, 1, kH, kW), (g, h, k) order; depthwise conv
    output_factors: np.ndarray  # (N, G*K, 1, 1), inputs in (g, k) order; conv group=H
    in_order: np.ndarray  # (C,): stage-1 input channel i is original input channel in_order[i]
    mid_order: np.ndarray | None  # (G*H*K,): stage-3 input i is stage-2 output mid_order[i]
    out_order: np.ndarray  # (N,): stage-3 output channel j is original filter out_order[j]
    groups: tuple[int, int]  # (G, H)
    rank: int  # K after clipping
    relative_error: float

    def reconstruct(self) -> np.ndarray:
        """The dense (N, C, kH, kW) weight in the original channel orders."""
        g, h = self.groups
        k, n = self.rank, self.output_factors.shape[0]
        a = self.input_factors.astype(np.float64).reshape(g, h, k, -1)
        b = self.spatial_factors.astype(np.float64).reshape(
            g, h, k, *self.spatial_factors.shape[2:]
        )
        c = self.output_factors.astype(np.float64).reshape(h, n // h, g, k)
        blocks = np.einsum("hngk,ghkyx,ghkc->ghncyx", c, b, a, optimize=True)
        dense = _assemble(blocks, self.in_order, self.out_order)
        return dense.astype(self.spatial_factors.dtype)

    def stages(self, bias: np.ndarray | None = None) -> list[Stage]:
        """The chain to emit, in order (see the module docstring)."""
        middle = Stage.conv(self.spatial_factors, self.spatial_factors.shape[0], spatial=True)
        return _chain(self, middle, bias)


def bicluster_svd(
    weight: np.ndarray, groups: tuple[int, int], ranks: tuple[int, int], *, seed: int = 0
) -> BiclusterSVD:
    """Biclustering + two nested SVDs (Tucker-2 per block); ranks are clipped to the block's."""
    weight = np.asarray(weight)
    blocks, in_order, out_order = _bicluster(weight, groups, seed)
    g, h, q, p, kh, kw = blocks.shape
    k1 = max(1, min(ranks[0], p, q * kh * kw))
    k2 = max(1, min(ranks[1], q, p * kh * kw))
    fits = [_tucker2(blocks[i, j], k1, k2) for i in range(g) for j in range(h)]
    a = np.stack([f[0] for f in fits]).reshape(g, h, p, k1)
    core = np.stack([f[1] for f in fits]).reshape(g * h * k2, k1, kh, kw)
    b = np.stack([f[2] for f in fits]).reshape(g, h, q, k2)
    dtype = output_dtype(weight)
    result = BiclusterSVD(
        input_factors=a.transpose(0, 1, 3, 2).reshape(g * h * k1, p, 1, 1).astype(dtype),
        core=core.astype(dtype),
        output_factors=b.transpose(1, 2, 0, 3).reshape(h * q, g * k2, 1, 1).astype(dtype),
        in_order=in_order,
        mid_order=_mid_order(g, h, k2),
        out_order=out_order,
        groups=(g, h),
        ranks=(k1, k2),
        relative_error=0.0,
    )
    return replace(result, relative_error=relative_error(weight, result.reconstruct()))


def bicluster_outer(
    weight: np.ndarray,
    groups: tuple[int, int],
    rank: int,
    *,
    seed: int = 0,
    refine_iters: int = 50,
) -> BiclusterOuter:
    """Biclustering + outer-product (CP) decomposition of each block, rank clipped to full."""
    weight = np.asarray(weight)
    blocks, in_order, out_order = _bicluster(weight, groups, seed)
    g, h, q, p, kh, kw = blocks.shape
    t = kh * kw
    k = max(1, min(rank, p * t, t * q, p * q))
    # Blocks as 3-tensors (C/G, kH*kW, N/H).
    tensors = blocks.reshape(g, h, q, p, t).transpose(0, 1, 3, 4, 2)
    a, b, c = (
        f.reshape(g, h, -1, k) for f in _cp(tensors.reshape(g * h, p, t, q), k, refine_iters)
    )
    dtype = output_dtype(weight)
    result = BiclusterOuter(
        input_factors=a.transpose(0, 1, 3, 2).reshape(g * h * k, p, 1, 1).astype(dtype),
        spatial_factors=b.transpose(0, 1, 3, 2).reshape(g * h * k, 1, kh, kw).astype(dtype),
        output_factors=c.transpose(1, 2, 0, 3).reshape(h * q, g * k, 1, 1).astype(dtype),
        in_order=in_order,
        mid_order=_mid_order(g, h, k),
        out_order=out_order,
        groups=(g, h),
        rank=k,
        relative_error=0.0,
    )
    return replace(result, relative_error=relative_error(weight, result.reconstruct()))


def _bicluster(weight: np.ndarray, groups: tuple[int, int], seed: int):
    """Blocks (G, H, N/H, C/G, kH, kW) of the weight in cluster order, in_order, out_order."""
    if weight.ndim != 4:
        raise ValueError(f"weight must be 4-D (N, C, kH, kW), got shape {weight.shape}.")
    n, c, kh, kw = weight.shape
    g, h = (int(x) for x in groups)
    if g < 1 or h < 1 or c % g or n % h:
        raise ValueError(
            f"groups (G={g}, H={h}) must divide the input channels C={c} and filters N={n}."
        )
    w = weight.astype(np.float64)
    in_order = _cluster_order(w.transpose(1, 0, 2, 3).reshape(c, -1), g, seed)
    out_order = _cluster_order(w.reshape(n, -1), h, seed)
    permuted = w[out_order][:, in_order]
    blocks = permuted.reshape(h, n // h, g, c // g, kh, kw).transpose(2, 0, 1, 3, 4, 5)
    return blocks, in_order, out_order


def _cluster_order(rows: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Channel order grouping the k balanced clusters of the rows' lines, cluster by cluster."""
    if k == 1:
        return np.arange(rows.shape[0], dtype=np.int64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    lines = rows / np.where(norms > 0, norms, 1.0)
    labels = balanced_kmeans(lines, k, seed=seed, sign_invariant=True).labels
    return np.argsort(labels, kind="stable").astype(np.int64)


def _mid_order(g: int, h: int, k: int) -> np.ndarray | None:
    """Stage-3 input (h, g, k) <- stage-2 output (g, h, k); None when it is the identity."""
    if g == 1 or h == 1:
        return None
    hh, gg, kk = np.meshgrid(np.arange(h), np.arange(g), np.arange(k), indexing="ij")
    return ((gg * h + hh) * k + kk).reshape(-1).astype(np.int64)


def _assemble(blocks: np.ndarray, in_order: np.ndarray, out_order: np.ndarray) -> np.ndarray:
    """Inverse of `_bicluster`: blocks (G, H, N/H, C/G, kH, kW) to the original channel order."""
    g, h, q, p, kh, kw = blocks.shape
    permuted = blocks.transpose(1, 2, 0, 3, 4, 5).reshape(h * q, g * p, kh, kw)
    dense = np.empty_like(permuted)
    dense[np.ix_(out_order, in_order)] = permuted
    return dense


def _chain(fit: BiclusterSVD | BiclusterOuter, middle: Stage, bias) -> list[Stage]:
    g, h = fit.groups
    last_bias = None if bias is None else np.asarray(bias)[fit.out_order]
    return [
        *gather_unless_identity(fit.in_order),
        Stage.conv(fit.input_factors, g),
        middle,
        *gather_unless_identity(fit.mid_order),
        Stage.conv(fit.output_factors, h, bias=last_bias),
        *gather_unless_identity(inverse_permutation(fit.out_order)),
    ]


def _leading(matrix: np.ndarray, k: int) -> np.ndarray:
    """k leading left singular vectors, orthonormal even when k exceeds the matrix's rank."""
    rows, cols = matrix.shape
    if rows > cols and k <= cols:
        return np.linalg.svd(matrix, full_matrices=False)[0][:, :k]
    # Wide unfoldings (the usual case): the small Gram matrix's eigenvectors are much cheaper
    # than an SVD, and also complete the basis when k exceeds the rank.
    return np.linalg.eigh(matrix @ matrix.T)[1][:, ::-1][:, :k]


def _tucker2(block: np.ndarray, k1: int, k2: int):
    """Input factor (C/G, K1), core (K2, K1, kH, kW), output factor (N/H, K2) of one block."""
    q, p = block.shape[:2]
    a = _leading(block.transpose(1, 0, 2, 3).reshape(p, -1), k1)
    b = _leading(block.reshape(q, -1), k2)
    for _ in range(_HOOI_SWEEPS):
        projected = np.tensordot(b, block, axes=([0], [0]))  # (K2, P, kH, kW)
        a = _leading(projected.transpose(1, 0, 2, 3).reshape(p, -1), k1)
        projected = np.tensordot(block, a, axes=([1], [0]))  # (Q, kH, kW, K1)
        b = _leading(projected.reshape(q, -1), k2)
    core = np.tensordot(np.tensordot(b, block, axes=([0], [0])), a, axes=([1], [0]))
    return a, core.transpose(0, 3, 1, 2), b


def _cp(tensors: np.ndarray, k: int, refine_iters: int) -> list[np.ndarray]:
    """Factors (B, P, K), (B, T, K), (B, Q, K) of rank-K CP fits of B tensors (P, T, Q)."""
    _, p, t, q = tensors.shape
    if k >= min(p * t, t * q, p * q):
        exact = [_exact_cp(tensor) for tensor in tensors]
        return [np.stack([fit[mode] for fit in exact]) for mode in range(3)]
    factors = [np.zeros((len(tensors), n, k)) for n in (p, t, q)]
    residual = tensors.copy()
    for r in range(k):
        a, b, c = _rank1_als(residual)
        residual -= a[:, :, None, None] * b[:, None, :, None] * c[:, None, None, :]
        for factor, vector in zip(factors, (a, b, c), strict=True):
            factor[:, :, r] = vector
    return _balance(_joint_als(tensors, factors, refine_iters))


def _rank1_als(tensors: np.ndarray):
    """Best rank-1 term of each (P, T, Q) tensor of a batch by alternating least squares."""
    a = np.ones(tensors.shape[:2])
    # Start from the leading spatial vector (kH*kW is small), and from the heaviest row of the
    # tensor contracted with it for the output side; ALS then refines all three.
    b = np.linalg.eigh(np.einsum("nptq,npsq->nts", tensors, tensors))[1][:, :, -1]
    contracted = np.einsum("nptq,nt->npq", tensors, b)
    heaviest = np.argmax((contracted**2).sum(2), axis=1)
    c = contracted[np.arange(len(tensors)), heaviest]
    for _ in range(_RANK1_ALS_ITERS):
        previous = a
        a = _contract(tensors, b, c, "nptq,nt,nq->np", (b, c))
        b = _contract(tensors, a, c, "nptq,np,nq->nt", (a, c))
        c = _contract(tensors, a, b, "nptq,np,nt->nq", (a, b))
        if np.linalg.norm(a - previous) <= 1e-10 * max(np.linalg.norm(a), _TOL):
            break
    return a, b, c


def _contract(tensors, first, second, spec, others) -> np.ndarray:
    """One rank-1 ALS update: the tensor contracted with two vectors over their squared norms."""
    scale = np.maximum((others[0] ** 2).sum(1) * (others[1] ** 2).sum(1), _TOL)
    return np.einsum(spec, tensors, first, second, optimize=True) / scale[:, None]


def _joint_als(tensors: np.ndarray, factors: list[np.ndarray], iters: int) -> list[np.ndarray]:
    """Refine all K terms together: each factor in turn is the least-squares solution."""
    specs = ("nptq,ntk,nqk->npk", "nptq,npk,nqk->ntk", "nptq,npk,ntk->nqk")
    for _ in range(iters):
        previous = [f.copy() for f in factors]
        for mode, spec in enumerate(specs):
            first, second = (f for i, f in enumerate(factors) if i != mode)
            gram = (first.transpose(0, 2, 1) @ first) * (second.transpose(0, 2, 1) @ second)
            rhs = np.einsum(spec, tensors, first, second, optimize=True)
            factors[mode] = rhs @ np.linalg.pinv(gram, rcond=1e-12, hermitian=True)
        change = sum(np.linalg.norm(f - g) for f, g in zip(factors, previous, strict=True))
        if change <= 1e-10 * max(sum(np.linalg.norm(f) for f in factors), _TOL):
            break
    return factors


def _exact_cp(tensor: np.ndarray):
    """Exact slice-wise CP of a (P, T, Q) tensor with min(PT, TQ, PQ) terms."""
    p, t, q = tensor.shape
    sizes = {"pt": p * t, "tq": t * q, "pq": p * q}
    kind = min(sizes, key=sizes.get)
    if kind == "pt":
        a, b = np.repeat(np.eye(p), t, axis=1), np.tile(np.eye(t), (1, p))
        c = tensor.reshape(p * t, q).T
    elif kind == "tq":
        b, c = np.repeat(np.eye(t), q, axis=1), np.tile(np.eye(q), (1, t))
        a = tensor.reshape(p, t * q)
    else:
        a, c = np.repeat(np.eye(p), q, axis=1), np.tile(np.eye(q), (1, p))
        b = tensor.transpose(1, 0, 2).reshape(t, p * q)
    return _balance([a, b, c])


def _balance(factors: list[np.ndarray]) -> list[np.ndarray]:
    """Give the three factors of every term the same norm (better float32 round-off)."""
    norms = np.stack([np.linalg.norm(f, axis=-2) for f in factors])  # (3, ..., K)
    scale = np.cbrt(norms.prod(0))
    safe = np.where(norms > 0, norms, 1.0)
    return [f * np.expand_dims(scale / s, -2) for f, s in zip(factors, safe, strict=True)]
