"""Biclustered passes (Denton et al. 2014, section 3.4): bicluster-svd and bicluster-outer.

Input channels are clustered into G groups and output channels into H groups (`--groups G,H`);
each of the G*H blocks is approximated on its own, and the chain (decompose/bicluster.py) is
  Gather(in_order), Conv 1x1 group=G (C/G -> K1 per block), Conv kHxkW with the original
  strides/dilations/pads (bicluster-svd: group=G*H, K1 -> K2 per block; bicluster-outer:
  depthwise on the K maps), Gather (block order, when G, H > 1), Conv 1x1 group=H (each output
  cluster sums its G blocks, bias), and the output order restored.
The output order is folded into the readers where they allow it, else a Gather (permute.py).
The input order is folded into the producer where it allows it (a Conv feeding only this layer,
possibly through BatchNormalization/elementwise nodes, or an earlier channel Gather); otherwise a
Gather. The alternative, a dense block-sparse first 1x1 (C -> G*H*K1, zero outside the blocks)
reading the original order, was measured in onnxruntime (CPU, 1 thread, benchmarks/denton.py, on
96->256 5x5 at 27 px, 64->128 3x3 at 7 px and 32->32 3x3 at 40 px, G = H = 2): neither form was
consistently faster (differences within the +-10-30% noise of a shared 2-vCPU host, in both
directions), and the dense form costs G times the first stage's MACs, so it is used only for
G <= DENSE_MAX_GROUPS, 0: never by default.
Ranks: `--rank K` (both ranks), `--ranks K1,K2` (svd); `--speedup S` and `--max-error X` choose
the ranks, and G, H from GRID when `--groups` is not given. Skipped: grouped, 1-D and 1x1 convs,
and C, N not divisible by G, H."""

from __future__ import annotations

import logging

import numpy as np

from ..config import OptimizeConfig, RankSpec
from ..cost import ConvShape
from ..decompose.bicluster import BiclusterOuter, BiclusterSVD, bicluster_outer, bicluster_svd
from ..decompose.stages import Stage
from .base import ConvLayer, stage_geometry
from .monochromatic import Choice, ClusteredPass
from .permute import apply_fold, plan_producer

log = logging.getLogger(__name__)
GRID = ((1, 1), (2, 2), (4, 4), (2, 1), (1, 2))  # (G, H) tried when --groups is not given
RANK_DEFAULT_GROUPS = ((2, 2), (2, 1), (1, 2), (1, 1))  # for --rank without --groups
DENSE_MAX_GROUPS = 0  # see the module docstring: the Gather measured faster


class BiclusterSVDPass(ClusteredPass):
    """rank = (G, H, K1, K2)."""

    method = "bicluster-svd"
    two_ranks = True

    def skip_reason(self, layer: ConvLayer) -> str | None:
        if len(layer.kernel) != 2:
            return f"{self.method} needs a 2-D conv"
        if layer.group > 1:
            return f"grouped conv (group={layer.group}): {self.method} factors group=1 convs"
        if max(layer.kernel) == 1:
            return "1x1 kernel: nothing to cluster spatially (use channel-svd)"
        return None

    def full(self, layer: ConvLayer, groups: tuple[int, int]) -> tuple[int, ...]:
        """The largest ranks the decomposition keeps for these groups."""
        p, q, taps = (
            layer.in_channels // groups[0],
            layer.out_channels // groups[1],
            np.prod(layer.kernel),
        )
        return int(min(p, q * taps)), int(min(q, p * taps))

    def ranks(self, full: tuple[int, ...], step: int, steps: int) -> tuple[int, ...]:
        return tuple(max(1, round(f * step / steps)) for f in full)

    def record_rank(self, rank: tuple[int, ...]) -> list[int]:
        return list(rank[2:])

    @classmethod
    def plan_settings(cls, rank: tuple[int, ...]) -> dict:
        """rank = (G, H, K1, K2) or, for -outer, (G, H, K): the groups and the block ranks."""
        second = rank[3] if len(rank) > 3 else None
        return {"rank": RankSpec("rank", rank[2], second), "colors": None, "groups": rank[:2]}

    def layout(self, layer: ConvLayer, rank: tuple[int, ...]) -> list[ConvShape]:
        g, h, k1, k2 = rank
        c, n = layer.in_channels, layer.out_channels
        return [
            ConvShape((g * h * k1, c // g, 1, 1), stage_geometry(2, g)),
            ConvShape((g * h * k2, k1, *layer.kernel), stage_geometry(2, g * h, None, layer)),
            ConvShape((n, g * k2, 1, 1), stage_geometry(2, h)),
        ]

    def fit(self, layer: ConvLayer, rank: tuple[int, ...]) -> BiclusterSVD:
        return bicluster_svd(layer.weight, rank[:2], rank[2:], seed=self.seed)

    def choose(self, layer: ConvLayer, config: OptimizeConfig) -> Choice:
        c, n = layer.in_channels, layer.out_channels
        grid = [config.groups] if config.groups else GRID
        valid = [(g, h) for g, h in grid if c % g == 0 and n % h == 0]
        if not valid:
            g, h = grid[0]
            return Choice(reason=f"groups G={g}, H={h} must divide C={c} and N={n}")
        spec = config.target(self.method)
        if spec.kind == "rank":
            g, h = valid[0] if config.groups else next(x for x in RANK_DEFAULT_GROUPS if x in valid)
            wanted = (int(spec.value), spec.second or int(spec.value))[
                : len(self.full(layer, (g, h)))
            ]
            rank = (g, h, *(min(w, f) for w, f in zip(wanted, self.full(layer, (g, h)))))
            return Choice(rank, notes=[f"G={g}, H={h}"])
        options = [self._search(layer, groups, spec, config) for groups in valid]
        options = [o for o in options if o is not None]
        best = min(options, key=lambda o: _preference(o, spec), default=None)
        if best is None:
            return Choice(reason=f"no ranks cut the MACs {spec.value:g} times")
        rank, fit, _ = best
        return Choice(rank, fit, [f"G={rank[0]}, H={rank[1]}"])

    def _search(self, layer, groups, spec, config):
        """(rank, fit, macs) for one (G, H): the largest ranks within the MAC budget, or the
        smallest meeting the error (bisection on a common scale of the ranks)."""
        full = self.full(layer, groups)
        steps, multiple = max(full), config.rank_multiple

        def rank(step: int) -> tuple[int, ...]:
            return (*groups, *self.ranks(full, step, steps))

        if spec.kind == "speedup":
            chosen = self.speedup_rank(layer, groups, spec.value, multiple)
            if chosen is None:
                return None
            ranks = chosen[2:]
        else:
            lo, hi = 1, steps
            while not config.force and hi > 1 and self.chain_macs(layer, rank(hi)) >= layer.macs:
                hi -= max(1, hi // 8)  # past the layer's own MACs nothing pays: no fits there
            while lo < hi:
                mid = (lo + hi) // 2
                met = self.cached_fit(layer, rank(mid)).relative_error <= spec.value
                lo, hi = (lo, mid) if met else (mid + 1, hi)
            ranks = tuple(min(-(-r // multiple) * multiple, f) for r, f in zip(rank(lo)[2:], full))
        chosen = (*groups, *ranks)
        fit = self.cached_fit(layer, chosen)
        log.debug("%s: %s error %.4f", layer.node.name, chosen, fit.relative_error)
        return chosen, fit, self.chain_macs(layer, chosen)

    def speedup_rank(
        self, layer: ConvLayer, groups: tuple[int, int], speedup: float, multiple: int
    ) -> tuple[int, ...] | None:
        """(G, H, ranks): the largest ranks (a common scale, rounded down to `multiple`) whose
        chain costs at most 1/speedup of the layer's MACs; None when even rank 1 costs more."""
        full = self.full(layer, groups)
        steps, budget = max(full), layer.macs / speedup

        def rank(step: int) -> tuple[int, ...]:
            return (*groups, *self.ranks(full, step, steps))

        if self.chain_macs(layer, rank(1)) > budget:
            return None
        lo, hi = 1, steps
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.chain_macs(layer, rank(mid)) <= budget else (lo, mid - 1)
        return (*groups, *(r - r % multiple if r >= multiple else r for r in rank(lo)[2:]))

    def cached_fit(self, layer: ConvLayer, rank: tuple[int, ...]):
        """`fit`, remembered per rank for the searches."""
        cache = self.__dict__.setdefault("_fits", {})
        if rank not in cache:
            cache[rank] = self.fit(layer, rank)
        return cache[rank]

    def input_side(self, graph, layer, stages: list[Stage], config) -> tuple[list[Stage], str]:
        """Fold the leading Gather into the producer, or make the first 1x1 dense, or keep it."""
        if stages[0].kind != "gather":
            return stages, ""
        gather, first = stages[0], stages[1]
        fold = "calibration data given" if config.calibration else None
        fold = fold or plan_producer(graph, layer.node.inputs[0], gather.indices)
        if not isinstance(fold, str):
            apply_fold(graph, fold)
            return stages[1:], "input order folded into " + ", ".join(fold.nodes)
        if first.group <= DENSE_MAX_GROUPS:
            dense = Stage.conv(_dense_first(first, gather.indices), 1)
            return [dense, *stages[2:]], f"input order in a dense block-sparse 1x1 ({fold})"
        return stages, f"input order by Gather ({fold})"


class BiclusterOuterPass(BiclusterSVDPass):
    """rank = (G, H, K)."""

    method = "bicluster-outer"
    two_ranks = False

    def full(self, layer: ConvLayer, groups: tuple[int, int]) -> tuple[int, ...]:
        p, q, taps = (
            layer.in_channels // groups[0],
            layer.out_channels // groups[1],
            int(np.prod(layer.kernel)),
        )
        return (min(p * taps, taps * q, p * q),)

    def record_rank(self, rank: tuple[int, ...]) -> int:
        return rank[2]

    def layout(self, layer: ConvLayer, rank: tuple[int, ...]) -> list[ConvShape]:
        g, h, k = rank
        c, n = layer.in_channels, layer.out_channels
        return [
            ConvShape((g * h * k, c // g, 1, 1), stage_geometry(2, g)),
            ConvShape((g * h * k, 1, *layer.kernel), stage_geometry(2, g * h * k, None, layer)),
            ConvShape((n, g * k, 1, 1), stage_geometry(2, h)),
        ]

    def fit(self, layer: ConvLayer, rank: tuple[int, ...]) -> BiclusterOuter:
        return bicluster_outer(layer.weight, rank[:2], rank[2], seed=self.seed)


def _preference(option, spec) -> tuple:
    """Speedup targets: the lowest error; error targets: met first, then the fewest MACs."""
    _, fit, macs = option
    if spec.kind == "speedup":
        return (fit.relative_error,)
    met = fit.relative_error <= spec.value * (1 + 1e-6)
    return (not met, macs if met else fit.relative_error)


def _dense_first(first: Stage, in_order: np.ndarray) -> np.ndarray:
    """The grouped first 1x1 on gathered input as a dense 1x1 on the original order."""
    rows, per_group = first.weight.shape[:2]
    dense = np.zeros((rows, len(in_order), 1, 1), first.weight.dtype)
    group_of_row = np.arange(rows) // (rows // first.group)
    columns = in_order.reshape(first.group, per_group)[group_of_row]  # (rows, C/G)
    dense[np.arange(rows)[:, None], columns, 0, 0] = first.weight[:, :, 0, 0]
    return dense
