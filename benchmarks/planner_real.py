"""The planner (`method="auto"`) on the real pretrained models of benchmarks/real_models.py.

Whole-model speedup targets 2x, 3x and 4x (measured in onnxruntime CPU, batch 1, the
planner's own timing), with weight-only fits and with data-aware fits on calibration inputs
that are never evaluated on; every timing runs on real inputs (a model's speed can depend
on its values: a refitted classifier fed random noise gave PP-OCR's 18,710-way softmax
underflowing exponentials, 2.4 ms more per run). Per row: the planner's measured speedup, a
re-measurement side by side (against the original as shipped and against the original with
its denormal weights flushed, each its own pair), the latency model's error |predicted -
measured| / measured, the task agreement with the original, the planning wall time and which
methods the plan used.

- `nudenet`: nudenet 3.4.2's YOLOv8n `320n.onnx`; agreement = matched detections (same class,
  score within 0.05, IoU >= 0.5) on the photos of scikit-image and matplotlib (as is, mirrored,
  cropped); calibration: 32 augmented crops of those photos.
- `ocr-rec`: rapidocr 3.10.0's PP-OCRv6 recogniser (the detector is left original: its time is
  dominated by denormal weights, see real_models.py); agreement = exact lines and character
  error rate of rapidocr's pipeline on rendered text and scikit-image's page; calibration: text
  lines with other strings than the evaluated ones.

    OPENBLAS_NUM_THREADS=1 python benchmarks/planner_real.py [--models nudenet] [--speedups 2,3]

cp is left out of the candidates by default (`--exclude ""` keeps it).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnx

import onnx_lowrank as ol
from onnx_lowrank import auto
from onnx_lowrank.bench import bench
from onnx_lowrank.config import Calibration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real_models as rm  # noqa: E402
from planner import build_errors, latency_errors, pct, within_15  # noqa: E402
from realmodels import fetch, ocr, yolo  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def nudenet(workdir: str) -> dict:
    original = onnx.load(fetch.extract(fetch.wheel("nudenet", "3.4.2"), "nudenet/320n.onnx"))
    photos = yolo.photos()
    views = rm.evaluation_views(photos)
    calibration = os.path.join(workdir, "nudenet_calibration.npz")
    np.savez(calibration, images=yolo.augmentations(list(photos.values()), 32))
    reference = rm.detect_all(original, views)

    def agreement(model: onnx.ModelProto) -> dict:
        found = rm.detect_all(rm.unpin(model, original), views)
        matched, ref, cand = np.sum([yolo.match(reference[k], found[k]) for k in views], axis=0)
        return {"precision": matched / max(cand, 1), "recall": matched / max(ref, 1)}

    return {
        "name": "nudenet",
        "feeds": [{"images": x} for x in list(views.values())[:3]],  # (1, 3, 320, 320)
        "model": original,
        "shapes": rm.DETECTOR_SHAPE,
        "calibration": calibration,
        "agreement": agreement,
    }


def ocr_rec(workdir: str) -> dict:
    wheel = fetch.wheel("rapidocr", "3.10.0")
    paths = {
        part: fetch.extract(wheel, f"rapidocr/models/PP-OCRv6_{part}_small.onnx")
        for part in ("det", "rec")
    }
    original = onnx.load(paths["rec"])
    calibration = os.path.join(workdir, "ocr_rec_calibration.npz")
    np.savez(calibration, x=ocr.rec_calibration())
    documents = ocr.documents()
    engine = ocr.pipeline(paths["det"], paths["rec"])
    reference = {k: ocr.read(engine, image) for k, image in documents.items()}

    def agreement(model: onnx.ModelProto) -> dict:
        path = os.path.join(workdir, "rec.onnx")
        onnx.save(rm.unpin(model, original), path)
        engine = ocr.pipeline(paths["det"], path)
        counts = np.sum(
            [
                ocr.agreement(reference[k], ocr.read(engine, image))
                for k, image in documents.items()
            ],
            axis=0,
        )
        return {"exact": counts[0] / counts[1], "cer": counts[2] / counts[3]}

    return {
        "name": "ocr-rec",
        "feeds": [{original.graph.input[0].name: x[None]} for x in np.load(calibration)["x"][:3]],
        "model": original,
        "shapes": rm.OCR_SHAPES["rec"],
        "calibration": calibration,
        "agreement": agreement,
    }


MODELS = {"nudenet": nudenet, "ocr-rec": ocr_rec}


def run_plan(ctx: dict, speedup: float, fit: str, runs: int, threads: int | None) -> dict:
    options = {
        "method": "auto",
        "threads": threads,
        "speedup": speedup,
        "input_shapes": ctx["shapes"],
        "check": 0,
        "seed": 0,
        "fc": True,
    }
    if fit == "data":
        options["calibration"] = Calibration(ctx["calibration"], size=32, batch=8)
    row = {"model": ctx["name"], "target": speedup, "fit": fit}
    start = time.perf_counter()
    try:
        new, report = ol.optimize(ctx["model"], **options)
    except ol.LowRankError as exc:
        return {**row, "error": str(exc)}
    plan = report.plan
    pinned = rm._pinned(ctx["model"], ctx["shapes"])
    measured = plan.measured_ms
    methods = collections.Counter(m for m, _ in plan.choices().values())
    row.update(
        baseline_ms=plan.baseline_ms,
        predicted_ms=plan.predicted_ms,
        measured_ms=measured,
        speedup_planner=plan.baseline_ms / measured if measured else None,
        speedup_remeasured=bench([pinned, new], runs=runs, threads=threads, feeds=ctx["feeds"])[
            "speedup"
        ],
        speedup_vs_flushed=bench(
            [rm.flush_denormals(pinned), new], runs=runs, threads=threads, feeds=ctx["feeds"]
        )["speedup"],
        **latency_errors(plan),
        mac_speedup=report.totals["macs_before"] / report.totals["macs_after"],
        planning_s=time.perf_counter() - start,
        layers=len(plan.layers),
        factored=sum(methods.values()),
        methods=dict(methods),
        notes=list(plan.notes),
        trace=list(plan.trace),  # every plan built on the way, predicted and measured
        **ctx["agreement"](new),
    )
    print(format_row(row), flush=True)
    return row


def format_row(r: dict) -> str:
    head = f"{r['model']:8} {r['target']:>4g}x {r['fit']:7}"
    if "error" in r:
        return f"{head} error: {r['error']}"
    if "precision" in r:
        task = f"P {r['precision']:.2f} R {r['recall']:.2f}"
    else:
        task = f"exact {r['exact']:.2f} CER {r['cer']:.3f}"
    methods = ", ".join(f"{m} {n}" for m, n in r["methods"].items())
    return (
        f"{head} plan {r['speedup_planner'] or 0:5.2f}x re {r['speedup_remeasured']:5.2f}x"
        f" (flushed {r['speedup_vs_flushed']:5.2f}x) MACs {r['mac_speedup']:5.2f}x"
        f" pred err {100 * (r['prediction_error'] or 0):5.1f}%"
        f" (corrected {pct(r.get('corrected_error'))})"
        f"  {task}"
        f"  {r['planning_s']:6.0f}s  {r['factored']}/{r['layers']} layers: {methods}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="nudenet,ocr-rec")
    parser.add_argument("--speedups", default="2,3,4")
    parser.add_argument("--fits", default="weights,data")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--threads", type=int, default=None, help="onnxruntime threads (default: its own)"
    )
    parser.add_argument(
        "--exclude",
        default="cp",
        help="methods the planner may not use (default cp: its NLS "
        "fits take minutes per layer on 64-layer models)",
    )
    parser.add_argument("--out", default=os.path.join(RESULTS, "planner_real.json"))
    args = parser.parse_args()
    if args.exclude:
        auto.AUTO_METHODS = tuple(m for m in auto.AUTO_METHODS if m not in args.exclude.split(","))
    rows, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            ctx = MODELS[name](workdir)
            for speedup in map(float, args.speedups.split(",")):
                for fit in args.fits.split(","):
                    rows.append(run_plan(ctx, speedup, fit, args.runs, args.threads))
                    _write(args, rows, started)
    for what, errors in (
        ("table", [r.get("prediction_error") for r in rows]),
        ("corrected", [r.get("corrected_error") for r in rows]),
        ("corrected, every plan built", build_errors(rows)),
    ):
        errors = [e for e in errors if e is not None]
        if errors:
            print(f"predicted ({what}) vs measured latency: {within_15(errors)}")
    print(f"wrote {args.out}")
    return 0


def _write(args, rows: list[dict], started: float) -> None:
    meta = {
        "command": " ".join(sys.argv),
        "batch": 1,
        "threads": args.threads or "default",
        "seconds": time.perf_counter() - started,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=float)


if __name__ == "__main__":
    sys.exit(main())
