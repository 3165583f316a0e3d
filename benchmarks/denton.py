"""Denton et al.'s monochromatic and biclustered approximations, measured in onnxruntime (CPU).

Layers: Denton's 3->96 7x7 stride 2 at 224 px and 96->256 5x5 at 27 px (random weights); the first
and a middle conv of the trained sample models (samples/charnet, samples/digits, when present);
and of nudenet's 320n.onnx (a pretrained YOLOv8n, from the nudenet 3.4.2 wheel on PyPI, fetched
with `pip download` into ~/.cache/onnx-lowrank, never committed). First layers get monochromatic
with C' in {4, 6, 8, 12, 16}; the others bicluster-svd (G, H, K1, K2) = (2, 2, 19, 24),
(2, 2, 32, 32) and (2, 2, 8, 8), and bicluster-outer (C/2, 2, 6) (Denton's (48, 2, 6) on 96
channels), the first two also with the dense block-sparse first 1x1 instead of the input
Gather. Per row: the multiply-add ratio, the measured speedup (interleaved medians, batch 1,
one thread) and the relative weight error.

    python benchmarks/denton.py            # writes benchmarks/results/denton.json
    python benchmarks/denton.py --runs 60 --no-download
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # the fits: oversubscribed BLAS is 50x slower

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zipfile  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import onnx_lowrank as ol  # noqa: E402
from onnx_lowrank.bench import bench  # noqa: E402
from onnx_lowrank.graph import pin_input_shapes  # noqa: E402
from onnx_lowrank.passes import bicluster  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "onnx-lowrank", "nudenet-3.4.2")
COLORS = (4, 6, 8, 12, 16)


def layer_model(weight, bias, attrs: dict, size) -> onnx.ModelProto:
    """One Conv with these weights and attributes on a (1, C, *size) input."""
    inits = [numpy_helper.from_array(weight.astype(np.float32), "W")]
    inputs = ["x", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "B"))
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    graph = helper.make_graph(
        [node],
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.shape[1], *size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.shape[0], None, None])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def denton_layers() -> list[tuple[str, onnx.ModelProto, bool]]:
    rng = np.random.default_rng(0)
    first = rng.standard_normal((96, 3, 7, 7)) / np.sqrt(3 * 49)
    second = rng.standard_normal((256, 96, 5, 5)) / np.sqrt(96 * 25)
    return [
        (
            "denton 3->96 7x7/2 @224",
            layer_model(
                first, rng.standard_normal(96), {"strides": [2, 2], "pads": [3] * 4}, (224, 224)
            ),
            True,
        ),
        (
            "denton 96->256 5x5 @27",
            layer_model(second, rng.standard_normal(256), {"pads": [2] * 4}, (27, 27)),
            False,
        ),
    ]


def model_layers(name: str, path: str) -> list[tuple[str, onnx.ModelProto, bool]]:
    """The first conv and the middle one of the dense 2-D kxk convs (k > 1) of a model."""
    model = onnx.load(path)
    for value in model.graph.input:  # batch 1; a free image size is taken as 320 (nudenet)
        dims = value.type.tensor_type.shape.dim
        static = [
            d.dim_value if d.dim_value > 0 else (1 if i == 0 else 320) for i, d in enumerate(dims)
        ]
        pin_input_shapes(model, {value.name: tuple(static)})
    model = onnx.shape_inference.infer_shapes(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(model.graph.value_info) + list(model.graph.input)
    }
    convs = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = inits.get(node.input[1]) if node.op_type == "Conv" else None
        if weight is None or weight.ndim != 4 or attrs.get("group", 1) != 1:
            continue
        if node.input[0] not in shapes or "auto_pad" in attrs:
            continue
        bias = inits.get(node.input[2]) if len(node.input) > 2 else None
        convs.append((node.name, weight, bias, attrs, shapes[node.input[0]][2:]))
    if not convs:
        return []
    spatial = [c for c in convs[1:] if max(c[1].shape[2:]) > 1] or convs
    picks = [(convs[0], True), (spatial[len(spatial) // 2], False)]
    return [
        (
            f"{name} {n} {w.shape[1]}->{w.shape[0]} {w.shape[2]}x{w.shape[3]} @{s[0]}",
            layer_model(w, b, a, s),
            first,
        )
        for (n, w, b, a, s), first in picks
    ]


def nudenet_path(download: bool) -> str | None:
    """320n.onnx out of the nudenet 3.4.2 wheel (pip download into the cache, once)."""
    target = os.path.join(CACHE, "320n.onnx")
    if os.path.exists(target):
        return target
    wheels = glob.glob(os.path.join(CACHE, "nudenet-3.4.2-*.whl"))
    if not wheels and download:
        cmd = [sys.executable, "-m", "pip", "download", "nudenet==3.4.2", "--no-deps", "-d", CACHE]
        subprocess.run(cmd, check=False, capture_output=True)
        wheels = glob.glob(os.path.join(CACHE, "nudenet-3.4.2-*.whl"))
    if not wheels:
        return None
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((m for m in wheel.namelist() if m.endswith("320n.onnx")), None)
        if member is None:
            return None
        with open(target, "wb") as f:
            f.write(wheel.read(member))
    return target


def settings(model: onnx.ModelProto, first: bool) -> list[tuple[str, dict, bool]]:
    """(label, optimize options, dense first 1x1) per row."""
    if first:
        return [(f"mono C'={c}", {"method": "monochromatic", "colors": c}, False) for c in COLORS]
    c = numpy_helper.to_array(model.graph.initializer[0]).shape[1]
    rows = []
    for k1, k2 in ((19, 24), (32, 32)):
        for dense in (False, True):
            options = {"method": "bicluster-svd", "groups": (2, 2), "ranks": (k1, k2)}
            rows.append((f"svd 2,2 K={k1},{k2}{' dense' if dense else ''}", options, dense))
    small = {"method": "bicluster-svd", "groups": (2, 2), "ranks": (8, 8)}
    rows.append(("svd 2,2 K=8,8", small, False))  # pays on 32-64 channel layers too
    g = 48 if c % 48 == 0 else max(1, c // 2)
    rows.append(
        (f"outer {g},2 K=6", {"method": "bicluster-outer", "groups": (g, 2), "rank": 6}, False)
    )
    return rows


def measure(layers, runs: int) -> list[dict]:
    rows = []
    for name, model, first in layers:
        for label, options, dense in settings(model, first):
            bicluster.DENSE_MAX_GROUPS = 10**6 if dense else 0
            new, report = ol.optimize(model, check=0, force=True, rank_multiple=1, **options)
            record = report.records[0]
            row = {"layer": name, "setting": label, "status": record.status}
            if record.status != "rewritten":
                row["reason"] = record.reason
            else:
                timing = bench([model, new], runs=runs, warmup=5, threads=1)
                row.update(
                    rank=record.rank,
                    mac_ratio=record.macs_before / record.macs_after,
                    speedup=timing["speedup"],
                    weight_error=record.fit_error,
                    detail=record.detail,
                    dense_ms=timing["median_ms"][0],
                )
            rows.append(row)
            print(line(row), flush=True)
    bicluster.DENSE_MAX_GROUPS = 0
    return rows


def line(row: dict) -> str:
    head = f"{row['layer']:<44} {row['setting']:<24}"
    if row["status"] != "rewritten":
        return f"{head} skipped: {row.get('reason')}"
    return (
        f"{head} MACs {row['mac_ratio']:6.2f}x  measured {row['speedup']:5.2f}x"
        f"  weight err {row['weight_error']:.3f}  ({row['dense_ms']:.2f} ms dense)"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="timed runs per model (default 40)")
    parser.add_argument("--no-download", action="store_true", help="skip fetching nudenet")
    args = parser.parse_args(argv)
    layers = denton_layers()
    for sample in ("charnet", "digits"):
        path = os.path.join(ROOT, "samples", sample, "model.onnx")
        if os.path.exists(path):
            layers += model_layers(sample, path)
        else:
            print(f"# {path} not found: sample {sample} skipped", flush=True)
    nudenet = nudenet_path(not args.no_download)
    if nudenet:
        layers += model_layers("nudenet-320n", nudenet)
    else:
        print("# nudenet 320n.onnx unavailable (pip download failed or --no-download)")
    rows = measure(layers, args.runs)
    out = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "onnxruntime": ort.__version__,
        },
        "threads": 1,
        "batch": 1,
        "runs": args.runs,
        "rows": rows,
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "denton.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
