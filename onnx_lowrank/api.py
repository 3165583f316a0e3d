"""The Python API: optimize(model | path | gs.Graph) -> (same kind, Report), and inspect()."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .assemble import assemble, tag_origins
from .calibrate import Samples, fixed_batch, load_samples
from .config import NO_ENERGY, OptimizeConfig
from .cost import model_macs
from .datafit import DataContext, fit_layer, refit_kept
from .decompose.rank import rank_for_energy
from .errors import LowRankError
from .graph import (
    check_model,
    import_graph,
    infer_shapes,
    load_model,
    pin_input_shapes,
    save_model,
    weight_bytes,
)
from .passes import CONV_PASSES
from .passes.base import RankedPass, read_conv
from .passes.gemm import FcSVDPass, read_fc
from .report import LayerRecord, Report
from .runtime import random_inputs
from .validate import compare

log = logging.getLogger(__name__)

LEFT_ALONE = {"ConvTranspose", "QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger"}
FC_OPS = ("Gemm", "MatMul")
PLANNED_PASSES = {**CONV_PASSES, "fc-svd": FcSVDPass}  # what a plan's (method, rank) names
CHECK_SAMPLES = 64  # real inputs (--data, else calibration) the output check runs on


def optimize(
    model: onnx.ModelProto | str | os.PathLike | gs.Graph,
    config: OptimizeConfig | None = None,
    output: str | os.PathLike | None = None,
    external_data: bool = False,
    **options: Any,
):
    """Rewrite every Conv (and Gemm/MatMul) the config allows into its low-rank chain.

    `model` is an onnx.ModelProto, a path, or an onnx-graphsurgeon Graph; a Graph gives back a
    Graph, the others a ModelProto. Options mirror the CLI flags (method=, rank=, ranks=,
    energy=, max_error=, speedup=, force=, fc=, input_shapes=, check=, tolerance=, seed=, ...)
    when no `config` is given. With `output`, the model is also written there atomically
    (weights in `output`.data when `external_data`, the input used external data, or past 2 GB)."""
    config = config or OptimizeConfig.from_options(**options)
    original, external = _as_model(model)
    pinned = _pinned_copy(original, config)
    data = None
    if config.calibration is not None:
        cal = config.calibration
        samples = load_samples(cal.path, pinned, cal.preprocess, limit=cal.size)
        data = DataContext(pinned, samples, cal, config.seed)
    evaluation = None  # --data, read before any work: a bad path or shape ends the run at once
    if config.data and (config.check or config.method == "auto"):
        limit = None if config.method == "auto" else CHECK_SAMPLES  # the check needs no more
        evaluation = load_samples(config.data, pinned, config.data_preprocess, limit=limit)
    plan = None
    if config.method == "auto" or config.plan_path:
        from .auto import run_planner

        plan, (result, records) = run_planner(pinned, config, data, build, evaluation)
    else:
        result, records = build(pinned, config, data)
    report = Report(records=records, config=config.to_dict(), plan=plan)
    report.totals = _totals(pinned, result)
    if config.check:
        report.validation = _check(pinned, result, config, *_check_inputs(data, evaluation))
    if output is not None:
        save_model(result, output, external=external or external_data)
        report.totals["file_bytes_after"] = os.path.getsize(output)
    if isinstance(model, gs.Graph):
        return gs.import_onnx(result), report
    return result, report


def build(
    pinned: onnx.ModelProto,
    config: OptimizeConfig,
    data: DataContext | None = None,
    choices: dict | None = None,
) -> tuple[onnx.ModelProto, list[LayerRecord]]:
    """Import, rewrite (per the config, or per a plan's `choices`) and reassemble."""
    graph = import_graph(pinned)
    tag_origins(graph)
    records = rewrite_graph(graph, config, data, choices)
    return assemble(pinned, graph), records


def rewrite_graph(
    graph: gs.Graph,
    config: OptimizeConfig,
    data: DataContext | None = None,
    choices: dict[str, tuple[str, tuple[int, ...]]] | None = None,
) -> list[LayerRecord]:
    """Apply the configured passes to every candidate node of `graph`, in place; with `data`,
    conv layers are fitted on calibration data (datafit.py); with `choices` (a plan), each
    named node gets its own method and rank (a clustered method's rank also holds its groups or
    colours: the pass's `plan_settings`) and the others are kept."""
    fc_on = config.fc or config.method == "fc-svd"
    candidates = [n for n in graph.nodes if n.op == "Conv" or n.op in LEFT_ALONE or n.op in FC_OPS]
    records = []
    for node in _progress(candidates, config.progress):
        layer_config = config
        if choices is not None:
            if node.name not in choices:
                if node.op == "Conv" or node.op in FC_OPS:
                    records.append(_kept(graph, _skip(node, None, "kept by the plan"), data))
                continue
            method, rank = choices[node.name]
            settings = PLANNED_PASSES.get(method, RankedPass).plan_settings(tuple(rank))
            layer_config = replace(config, method=method, force=True, fc=True, **settings)
        if node.op in LEFT_ALONE:
            records.append(_skip(node, None, f"{node.op} is left as is"))
        elif node.op == "Conv":
            conv_pass = CONV_PASSES.get(layer_config.method)
            record = _rewrite_conv(graph, node, conv_pass, layer_config, data)
            records.append(record if record.status == "rewritten" else _kept(graph, record, data))
        elif fc_on or choices is not None:
            records.append(_rewrite_fc(graph, node, layer_config, data))
    return records


def _rewrite_fc(graph, node, config, data) -> LayerRecord:
    layer = read_fc(node)
    if isinstance(layer, str):
        return _skip(node, "fc-svd", layer)
    if data is not None:
        from .datafit_fc import fit_fc_layer

        return fit_fc_layer(graph, layer, FcSVDPass(), config, data)
    record = FcSVDPass().rewrite(graph, layer, config)
    record.fit = "weights" if record.status == "rewritten" else None
    return record


def _rewrite_conv(graph, node, conv_pass, config, data) -> LayerRecord:
    if conv_pass is None:
        return _skip(node, None, f"method {config.method} does not apply to Conv")
    layer = read_conv(node)
    if isinstance(layer, str):
        return _skip(node, conv_pass.method, layer)
    if data is not None:
        return fit_layer(graph, layer, conv_pass(seed=config.seed), config, data)
    record = conv_pass(seed=config.seed).rewrite(graph, layer, config)
    record.fit = "weights" if record.status == "rewritten" else None
    return record


def _kept(graph: gs.Graph, record: LayerRecord, data) -> LayerRecord:
    """A conv left as it is, refitted to the compressed upstream when the data fit says so."""
    return record if data is None else refit_kept(graph, record, data)


def _skip(node: gs.Node, method: str | None, reason: str) -> LayerRecord:
    return LayerRecord(node=node.name, op=node.op, method=method, status="skipped", reason=reason)


def inspect(
    model: onnx.ModelProto | str | os.PathLike,
    input_shapes: dict | None = None,
    spectra: bool = False,
) -> list[dict]:
    """Per factorable layer: weight shape, MACs, share of the model's MACs, and the rank each
    method needs for 90/95/99% energy (with `spectra`, the singular values themselves)."""
    original, _ = _as_model(model)
    pinned = _pinned_copy(original, OptimizeConfig(input_shapes=input_shapes or {}, check=0))
    graph = import_graph(pinned)
    rows = []
    for node in graph.nodes:
        if node.op == "Conv":
            layer, passes = read_conv(node), [p() for p in CONV_PASSES.values()]
        elif node.op in FC_OPS:
            layer, passes = read_fc(node), [FcSVDPass()]
        else:
            continue
        if isinstance(layer, str):
            rows.append({"node": node.name, "op": node.op, "skipped": layer})
            continue
        weight = getattr(layer, "weight", getattr(layer, "matrix", None))
        row = {
            "node": node.name,
            "op": node.op,
            "weight_shape": list(weight.shape),
            "macs": layer.macs,
            "energy_ranks": {},
        }
        for p in passes:
            if p.method in NO_ENERGY:  # no spectrum, so no energy ranks
                continue
            if getattr(p, "skip_reason", lambda _: None)(layer) is None:
                slots = p.spectra(layer)
                row["energy_ranks"][p.method] = {
                    f"{e:g}": [max(rank_for_energy(s, e) for s in slot) for slot in slots]
                    for e in (0.90, 0.95, 0.99)
                }
                if spectra:  # the first rank slot, group by group concatenated
                    row.setdefault("spectra", {})[p.method] = np.sort(np.concatenate(slots[0]))[
                        ::-1
                    ].tolist()
        rows.append(row)
    total = sum(r.get("macs", 0) for r in rows) or 1
    for r in rows:
        if "macs" in r:
            r["share"] = r["macs"] / total
    return rows


def _as_model(model) -> tuple[onnx.ModelProto, bool]:
    if isinstance(model, onnx.ModelProto):
        check_model(model)
        return model, False
    if isinstance(model, gs.Graph):
        return gs.export_onnx(model), False
    if isinstance(model, (str, os.PathLike)):
        loaded = load_model(model)
        return loaded.model, loaded.external
    raise LowRankError(
        f"expected an onnx.ModelProto, a path or a gs.Graph, got {type(model).__name__}"
    )


def _pinned_copy(model: onnx.ModelProto, config: OptimizeConfig) -> onnx.ModelProto:
    if not config.input_shapes:
        return model
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    pin_input_shapes(pinned, config.input_shapes)
    return pinned


def _totals(before: onnx.ModelProto, after: onnx.ModelProto) -> dict:
    totals = {}
    for key, fn in (
        ("macs", lambda m: model_macs(infer_shapes(m))),
        ("params", _params),
        ("nodes", lambda m: len(m.graph.node)),
        ("file_bytes", _size),
    ):
        totals[f"{key}_before"], totals[f"{key}_after"] = fn(before), fn(after)
    return totals


def _params(model: onnx.ModelProto) -> int:
    sizes = [int(np.prod(t.dims)) for t in model.graph.initializer]
    sizes += [
        int(np.prod(a.t.dims))
        for n in model.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    ]
    return sum(sizes)


def _size(model: onnx.ModelProto) -> int:
    try:
        return model.ByteSize()
    except (ValueError, OverflowError):
        return weight_bytes(model)


def _check_inputs(
    data: DataContext | None, evaluation: Samples | None
) -> tuple[Samples | None, str]:
    """The real inputs the output check runs on: the first CHECK_SAMPLES of --data, else of
    the calibration samples; none (random inputs) without either."""
    if evaluation is not None:
        return evaluation.head(CHECK_SAMPLES), "--data"
    if data is not None:
        return data.samples.head(CHECK_SAMPLES), "calibration"
    return None, "random"


def _check(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    config: OptimizeConfig,
    samples: Samples | None,
    source: str,
) -> dict:
    """The new model's outputs against the original's, on `samples` (with accuracy when they
    have labels) or, without them, on `config.check` seeded random inputs."""
    if samples is None:
        feeds, labels = random_inputs(before, config.check, seed=config.seed), None
    else:
        feeds, labels = list(samples.batches(fixed_batch(before, samples) or 32)), samples.labels
    result = compare(before, after, feeds, labels, provider=config.provider)
    result["inputs"] = source
    if config.tolerance is not None:
        result["tolerance"] = config.tolerance
        result["passed"] = result["max_rel_error"] <= config.tolerance
    return result


def _progress(items: list, enabled: bool) -> Iterable:
    if not enabled or len(items) < 2:
        return items
    from rich.console import Console
    from rich.progress import track

    return track(
        items, description="factoring layers", transient=True, console=Console(stderr=True)
    )
