"""Monochromatic pass (Denton et al. 2014, section 3.3), and what every clustered pass shares.

Conv kHxkW (C -> N) becomes Conv 1x1 (C -> C', the cluster centres: one colour line each), then
Conv kHxkW (group=C', C' -> N) with the original strides, dilations, pads and bias, whose group c
makes the filters of colour cluster c. Those come out in cluster order; permute.py folds the
order into the readers or restores it with a Gather. Targets: `--colors C'` (the nearest divisor
of N when C' does not divide it), `--speedup S` (the most colours whose chain cuts MACs S times),
`--max-error X` (the fewest colours meeting X); the default is the max-error that --energy 0.95
implies for the other methods. Applied only to convs with C <= 4 input channels (first layers)
unless `--force`. Skipped: grouped and 1-D convs.

`ClusteredPass` emits a chain given as decompose/stages.py `Stage` records (Convs and channel
Gathers) and handles its leading and trailing permutations (see permute.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..config import OptimizeConfig
from ..cost import ConvShape, chain_macs
from ..decompose.monochromatic import Monochromatic, monochromatic, nearest_divisor
from ..decompose.stages import Stage, inverse_permutation
from ..report import LayerRecord
from .base import ConvLayer, ConvPass, add_node, new_record, remove_node, stage_geometry
from .permute import apply_fold, insert_gather, plan_readers

log = logging.getLogger(__name__)
MAX_COLOR_CHANNELS = 4


@dataclass
class Choice:
    """The chain's size (`rank`: the pass's own tuple), a fit if one was made, and notes."""

    rank: tuple[int, ...] | None = None
    fit: object | None = None
    notes: list[str] = field(default_factory=list)
    reason: str | None = None
    fixed: bool = False  # the user gave the size (--colors): no error target applies


class ClusteredPass(ConvPass):
    """A conv pass whose chain is a list of Stage records with channel permutations."""

    def choose(self, layer: ConvLayer, config: OptimizeConfig) -> Choice:
        """The chain's size for the user's target (may fit, and may say why not)."""
        raise NotImplementedError

    def fit(self, layer: ConvLayer, rank: tuple[int, ...]):
        """The decompose/ result (with stages(), reconstruct(), relative_error) at `rank`."""
        raise NotImplementedError

    def decompose(self, layer: ConvLayer, rank: tuple[int, ...]):
        """`fit`: what the planner's error estimates call for every method."""
        return self.fit(layer, rank)

    def record_rank(self, rank: tuple[int, ...]) -> int | list[int]:
        return rank[0]

    def input_side(self, graph, layer, stages: list[Stage], config) -> tuple[list[Stage], str]:
        """Deal with a leading Gather (the input order); monochromatic has none."""
        return stages, ""

    def rewrite(self, graph: gs.Graph, layer: ConvLayer, config: OptimizeConfig) -> LayerRecord:
        """Choose, fit, splice the chain in and restore the output order; say what was done."""
        record = new_record(layer, self.method)
        record.reason = self.skip_reason(layer)
        choice = self.choose(layer, config) if not record.reason else Choice()
        record.reason = record.reason or choice.reason
        if record.reason:
            return record
        record.rank = self.record_rank(choice.rank)
        layout = self.layout(layer, choice.rank)
        record.macs_after = chain_macs(layout, layer.spatial_in)
        record.params_after = sum(s.params for s in layout)
        if record.macs_after >= record.macs_before and not config.force:
            ratio = record.macs_after / record.macs_before
            record.reason = f"no gain: the chain costs {ratio:.2f}x the layer's MACs"
            return record
        fit = choice.fit or self.fit(layer, choice.rank)
        record.fit_error = float(fit.relative_error)
        spec = config.target(self.method)
        if spec.kind == "error" and not choice.fixed and record.fit_error > spec.value * (1 + 1e-6):
            record.reason = (
                f"best fit found has weight error {record.fit_error:.4f} > {spec.value:g}"
            )
            return record
        notes, stages = self.splice(graph, layer, fit.stages(layer.bias), config)
        shapes = [_shape(layer, s) for s in stages if s.kind == "conv"]
        record.macs_after = chain_macs(shapes, layer.spatial_in)  # the dense 1x1 costs more
        record.params_after = sum(s.params for s in shapes)
        record.status, record.reason = "rewritten", None
        notes = choice.notes + notes
        record.detail = "; ".join(n for n in notes if n)
        return record

    def splice(self, graph, layer: ConvLayer, stages: list[Stage], config):
        """Replace the node by the stages, the output order folded or restored; the notes for
        the record and the stages emitted."""
        stages, input_note = self.input_side(graph, layer, stages, config)
        trailing = stages.pop() if stages[-1].kind == "gather" else None
        node = layer.node
        base = node.name or node.outputs[0].name
        output = node.outputs[0]
        note = ""
        if trailing is not None:
            order = inverse_permutation(trailing.indices)  # chain channel j = original order[j]
            fold = "calibration data given" if config.calibration else None
            fold = fold or plan_readers(graph, output, order)
            if isinstance(fold, str):
                note = f"output order restored by Gather ({fold})"
                output = gs.Variable(f"{base}/{self.method}/chain_out", dtype=layer.weight.dtype)
            else:
                apply_fold(graph, fold)
                note = "output order folded into " + ", ".join(fold.nodes) if fold.nodes else ""
        last = self.emit(graph, layer, stages, output)
        if trailing is not None and output is not node.outputs[0]:
            target = node.outputs[0]
            remove_node(graph, node)
            insert_gather(graph, node, last, target, trailing.indices, f"{base}/{self.method}/out")
        else:
            remove_node(graph, node)
        return [input_note, note], stages

    def emit(self, graph, layer: ConvLayer, stages: list[Stage], output: gs.Tensor) -> gs.Tensor:
        """One node per stage from the layer's input; the last writes `output`."""
        node = layer.node
        base = node.name or node.outputs[0].name
        shared = len(node.inputs[1].outputs) > 1
        weight_name = f"{base}.weight" if shared else node.inputs[1].name
        dtype, current = layer.weight.dtype, node.inputs[0]
        for i, stage in enumerate(stages):
            name = f"{base}/{self.method}/{i}"
            out = output if i == len(stages) - 1 else gs.Variable(f"{name}_out", dtype=dtype)
            if stage.kind == "gather":
                insert_gather(graph, node, current, out, stage.indices, name)
            else:
                inputs = [
                    current,
                    gs.Constant(f"{weight_name}/{self.method}/{i}", _arr(stage.weight, dtype)),
                ]
                if stage.bias is not None:
                    bias_name = node.inputs[2].name or f"{base}.bias"
                    inputs.append(
                        gs.Constant(f"{bias_name}/{self.method}", _arr(stage.bias, dtype))
                    )
                add_node(
                    graph, node, gs.Node("Conv", name, _conv_attrs(layer, stage), inputs, [out])
                )
            current = out
        return current


class MonochromaticPass(ClusteredPass):
    method = "monochromatic"

    def skip_reason(self, layer: ConvLayer) -> str | None:
        if len(layer.kernel) != 2:
            return "monochromatic needs a 2-D conv"
        if layer.group > 1:
            return f"grouped conv (group={layer.group}): monochromatic factors group=1 convs"
        return None

    def layout(self, layer: ConvLayer, rank: tuple[int, ...]) -> list[ConvShape]:
        (colors,), nd = rank, 2
        return [
            ConvShape((colors, layer.in_channels, 1, 1), stage_geometry(nd)),
            ConvShape(
                (layer.out_channels, 1, *layer.kernel), stage_geometry(nd, colors, None, layer)
            ),
        ]

    def fit(self, layer: ConvLayer, rank: tuple[int, ...]) -> Monochromatic:
        return monochromatic(layer.weight, rank[0], seed=self.seed)

    @classmethod
    def plan_settings(cls, rank: tuple[int, ...]) -> dict:
        """rank = (C',): the colours, a divisor of N in a plan, so `choose` keeps it."""
        return {"rank": None, "colors": rank[0], "groups": None}

    def choose(self, layer: ConvLayer, config: OptimizeConfig) -> Choice:
        n, c = layer.out_channels, layer.in_channels
        if c > MAX_COLOR_CHANNELS and not config.force:
            return Choice(
                reason=f"C={c} input channels: monochromatic is for first layers "
                f"(C <= {MAX_COLOR_CHANNELS}; --force applies it anyway)"
            )
        if config.colors is not None:
            colors = nearest_divisor(n, config.colors)
            note = f"{colors} colours"
            if colors != config.colors:
                note += f" (--colors {config.colors} does not divide N={n}: the nearest divisor)"
            return Choice((colors,), notes=[note], fixed=True)
        spec = config.target(self.method)
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        if spec.kind == "speedup":
            fits = [d for d in divisors if self.chain_macs(layer, (d,)) * spec.value <= layer.macs]
            if not fits:
                return Choice(reason=f"no number of colours cuts the MACs {spec.value:g} times")
            return Choice((fits[-1],), notes=[f"{fits[-1]} colours"])
        fit = None
        for colors in divisors:  # the fewest colours meeting the error, while the chain pays
            if fit is not None and self.chain_macs(layer, (colors,)) >= layer.macs:
                break
            fit = self.fit(layer, (colors,))
            if fit.relative_error <= spec.value:
                break
        return Choice((fit.n_colors,), fit, [f"{fit.n_colors} colours"])


def _shape(layer: ConvLayer, stage: Stage) -> ConvShape:
    nd = stage.weight.ndim - 2
    layer_or_none = layer if stage.spatial else None
    return ConvShape(
        tuple(stage.weight.shape), stage_geometry(nd, stage.group, None, layer_or_none)
    )


def _conv_attrs(layer: ConvLayer, stage: Stage) -> dict:
    g = _shape(layer, stage).geometry
    return {
        "kernel_shape": list(stage.weight.shape[2:]),
        "strides": list(g.strides),
        "dilations": list(g.dilations),
        "pads": list(g.pads),
        "group": stage.group,
    }


def _arr(value: np.ndarray, dtype) -> np.ndarray:
    return np.ascontiguousarray(value, dtype)
