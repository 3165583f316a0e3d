"""Per-layer records and model totals -> a terminal table (rich) and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class LayerRecord:
    """What happened to one node: rewritten (with rank and costs) or skipped (with the reason)."""

    node: str
    op: str
    method: str | None
    status: str  # "rewritten" or "skipped"
    reason: str | None = None
    rank: int | list[int] | None = None
    weight_shape: list[int] | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    fit_error: float | None = None
    shape_known: bool = True
    detail: str | None = None  # what else was done, e.g. "output order folded into conv2"
    fit: str | None = None  # "weights", "weights+bias", "data" (whitened and/or refitted)
    output_error_before: float | None = None  # relative output error on calibration data,
    output_error_after: float | None = None  # before and after the refit / bias correction

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    """The records of one optimize run, the model totals, and the validation result."""

    records: list[LayerRecord] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    plan: Any = None  # plan.Plan when --method auto planned the model

    @property
    def rewritten(self) -> list[LayerRecord]:
        return [r for r in self.records if r.status == "rewritten"]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.records if r.status == "skipped"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "layers": [r.to_dict() for r in self.records],
            "totals": self.totals,
            "validation": self.validation,
            "plan": self.plan.to_dict() if self.plan is not None else None,
        }

    def to_json(self, path: str) -> None:
        """Write the report as JSON (the machine-readable twin of the table)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, default=_jsonable)
            f.write("\n")

    def render(self, console: Console, verbose: bool = False) -> None:
        """Print the per-layer table, the totals and the check, in the manner of onnxsim."""
        console.print(layer_table(self.records, verbose))
        if self.plan is not None:
            console.print(plan_table(self.plan))
        if self.totals:
            console.print(totals_table(self.totals))
        if self.validation:
            console.print(validation_line(self.validation))


def layer_table(records: list[LayerRecord], verbose: bool = False) -> Table:
    """One row per rewritten layer; skipped ones too when verbose (else a count). With
    calibration data, the fit used and the output error before -> after the refit."""
    table = Table(title="Layers", title_justify="left")
    data = any(r.output_error_after is not None for r in records)
    columns = ["node", "op", "method", "rank", "MACs before", "MACs after", "ratio", "weight err"]
    columns += ["fit", "output err (calibration)"] if data else []
    for col in columns:
        right = col[0].isupper() or col in ("ratio", "rank", "weight err")
        table.add_column(col, justify="right" if right else "left")
    table.add_column("status / reason")
    shown = [r for r in records if verbose or r.status == "rewritten"]
    for r in shown:
        ratio = f"{r.macs_before / r.macs_after:.2f}x" if r.macs_before and r.macs_after else ""
        cells = [
            r.node,
            r.op,
            r.method or "",
            _rank_text(r.rank),
            _count(r.macs_before),
            _count(r.macs_after),
            ratio,
            _number(r.fit_error),
        ]
        if data:
            change = (
                f"{r.output_error_before:.4f} -> {r.output_error_after:.4f}"
                if r.output_error_after is not None
                else ""
            )
            cells += [r.fit or "", change]
        status = r.status + (f" ({r.detail})" if r.detail else "")
        table.add_row(*cells, status if r.status == "rewritten" else f"skipped: {r.reason}")
    hidden = len(records) - len(shown)
    if hidden:
        table.caption = f"{hidden} layer(s) skipped; -v lists them with the reason"
    return table


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def totals_table(totals: dict[str, Any]) -> Table:
    """Model-wide before/after: MACs, parameters, file size, node count."""
    table = Table(title="Model", title_justify="left")
    for col in ("", "before", "after", "change"):
        table.add_column(col, justify="right" if col else "left")
    for key, label in (
        ("macs", "MACs"),
        ("params", "Parameters"),
        ("nodes", "Nodes"),
        ("file_bytes", "Size (bytes)"),
    ):
        before, after = totals.get(f"{key}_before"), totals.get(f"{key}_after")
        if before is None or after is None:
            continue
        change = f"{after / before:.3f}x" if before else ""
        table.add_row(label, _count(before), _count(after), change)
    return table


def validation_line(v: dict[str, Any]) -> str:
    """One line with the output agreement of the original and new model."""
    if v.get("skipped"):
        return f"check: skipped ({v['skipped']})"
    parts = [f"max abs err {v['max_abs_error']:.3g}", f"max rel err {v['max_rel_error']:.3g}"]
    if v.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {100 * v['top1_agreement']:.1f}%")
    verdict = ""
    if v.get("tolerance") is not None:
        verdict = "  [PASS]" if v.get("passed") else f"  [FAIL: above tolerance {v['tolerance']:g}]"
    if v.get("accuracy_reference") is not None:
        parts.append(
            f"accuracy {100 * v['accuracy_reference']:.2f}% -> {100 * v['accuracy_candidate']:.2f}%"
        )
    inputs = v.get("inputs", "random")
    return f"check on {v['samples']} {inputs} input(s): " + ", ".join(parts) + verdict


def _rank_text(rank: int | list[int] | None) -> str:
    if rank is None:
        return ""
    return ",".join(map(str, rank)) if isinstance(rank, (list, tuple)) else str(rank)


def _count(n: int | None) -> str:
    if n is None:
        return ""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def inspect_table(rows: list[dict]) -> Table:
    """`inspect`: per layer, shape, MACs, share, and the ranks for 90/95/99% energy."""
    table = Table(title="Factorable layers", title_justify="left")
    for col in ("node", "op", "weight", "MACs", "share", "ranks for 90/95/99% energy"):
        table.add_column(col, justify="right" if col in ("MACs", "share") else "left")
    for r in rows:
        if "skipped" in r:
            table.add_row(r["node"], r["op"], "", "", "", f"skipped: {r['skipped']}")
            continue
        ranks = (
            "; ".join(
                f"{method} "
                + " / ".join(_rank_text(v if len(v) > 1 else v[0]) for v in by.values())
                for method, by in r["energy_ranks"].items()
            )
            or "no method applies"
        )
        table.add_row(
            r["node"],
            r["op"],
            "x".join(map(str, r["weight_shape"])),
            _count(r["macs"]),
            f"{100 * r['share']:.1f}%",
            ranks,
        )
    return table


def compare_table(result: dict, name_a: str, name_b: str) -> Table:
    """`compare`: agreement and, with labels, the accuracy of both models."""
    table = Table(title=f"{name_a}  vs  {name_b}", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("samples", str(result["samples"]))
    table.add_row("max abs error", f"{result['max_abs_error']:.4g}")
    table.add_row("max rel error", f"{result['max_rel_error']:.4g}")
    if result.get("top1_agreement") is not None:
        table.add_row("top-1 agreement", f"{100 * result['top1_agreement']:.2f}%")
    if "accuracy_reference" in result:
        table.add_row(f"top-1 accuracy {name_a}", f"{100 * result['accuracy_reference']:.2f}%")
        table.add_row(f"top-1 accuracy {name_b}", f"{100 * result['accuracy_candidate']:.2f}%")
        drop = result["accuracy_reference"] - result["accuracy_candidate"]
        table.add_row("accuracy drop", f"{100 * drop:.2f} points")
    return table


def bench_table(result: dict) -> Table:
    """`bench`: median latency per model and the speedup of the second."""
    table = Table(
        title=f"onnxruntime {result['onnxruntime']} on {result['provider']}, batch "
        f"{result['batch']}, threads {result['threads']}, median of {result['runs']}",
        title_justify="left",
    )
    for col in ("model", "median ms", "min ms"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, med, low in zip(result["models"], result["median_ms"], result["min_ms"]):
        table.add_row(name, f"{med:.3f}", f"{low:.3f}")
    if "speedup" in result:
        table.caption = f"speedup of the second: {result['speedup']:.2f}x"
    return table


def plan_table(plan) -> Table:
    """The planner's choice per layer: method, rank, error, predicted ms against the original."""
    target = plan.target
    table = Table(
        title=f"Plan ({target.get('kind')} {target.get('value')}, {plan.provider}, "
        f"batch {plan.batch})",
        title_justify="left",
    )
    profiled = plan.profiled_other_ms is not None
    columns = ["node", "method", "rank", "error", "ms original", "ms predicted"]
    columns += ["ms measured orig", "ms measured"] if profiled else []
    for col in columns:
        table.add_column(col, justify="left" if col in ("node", "method") else "right")
    for layer in plan.layers:
        chosen, original = layer.chosen, layer.options[0]
        measured = [f"{ms:.3f}" for ms in layer.profiled_ms or ()] if profiled else []
        table.add_row(
            layer.node,
            chosen.method or "(kept)",
            _rank_text(chosen.rank),
            f"{chosen.error:.4f}",
            f"{original.ms:.3f}",
            f"{chosen.ms:.3f}",
            *measured,
        )
    if profiled:
        table.add_row(
            "(rest of the graph)",
            "",
            "",
            "",
            "",
            "",
            *(f"{ms:.3f}" for ms in plan.profiled_other_ms),
        )
    measured = (
        f", measured {plan.measured_ms:.3f} ms ({plan.baseline_ms / plan.measured_ms:.2f}x)"
        if plan.measured_ms
        else ""
    )
    corrected = ""
    if plan.corrected_ms:
        source = (
            "its architecture's trial build"
            if plan.corrected_changed == 0
            else "the in-place timings of the plans built before it"
        )
        corrected = f" ({plan.corrected_ms:.3f} ms after {source})"
    table.caption = (
        f"model: {plan.baseline_ms:.3f} ms, predicted {plan.predicted_ms:.3f} ms "
        f"({plan.predicted_speedup:.2f}x){corrected}{measured}"
        + "".join(f"; {note}" for note in plan.notes)
    )
    return table
