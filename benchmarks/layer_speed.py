"""Measured onnxruntime CPU speedup of single factored layers against their multiply-add ratio.

For each method, on VGG-16's 3x3 layer shapes (64-512 channels, 224-14 px) and on Denton's
96->256 5x5 layer at 27 px, with random weights, at the ranks giving 2x, 4x and 8x fewer MACs
(`--speedup S`, ranks rounded down to a multiple of 8): the MAC ratio and the measured speedup
(medians of interleaved runs, side by side in one process), at batch 1 and 8.

    python benchmarks/layer_speed.py                    # all layers, one thread
    python benchmarks/layer_speed.py --quick            # three layers, batch 1
    python benchmarks/layer_speed.py --threads 0        # onnxruntime's default thread count
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank as ol
from onnx_lowrank.bench import bench
from onnx_lowrank.config import CLUSTERED
from onnx_lowrank.passes import CONV_PASSES

# (name, C, N, k, input size, pads)
VGG16 = [
    (f"vgg{c}-{n}@{s}", c, n, 3, s, 1)
    for c, n, s in [
        (64, 64, 224),
        (64, 128, 112),
        (128, 128, 112),
        (128, 256, 56),
        (256, 256, 56),
        (256, 512, 28),
        (512, 512, 28),
        (512, 512, 14),
    ]
]
DENTON = [("denton96-256k5@27", 96, 256, 5, 27, 2)]
QUICK = ["vgg128-128@112", "vgg512-512@14", "denton96-256k5@27"]
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def layer_model(c: int, n: int, k: int, size: int, pad: int, seed: int = 0) -> onnx.ModelProto:
    """One Conv with bias and random weights, batch dimension free."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(
        (rng.standard_normal((n, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32), "W"
    )
    b = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "B")
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", pads=[pad] * 4)
    graph = helper.make_graph(
        [node],
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n, size, size])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def measure(args) -> list[dict]:
    layers = [layer for layer in VGG16 + DENTON if not args.quick or layer[0] in QUICK]
    if args.layers:
        layers = [layer for layer in layers if layer[0] in args.layers]
    # Denton's clustered methods need --colors/--groups and have their own script (denton.py)
    methods = args.methods or [m for m in CONV_PASSES if m not in CLUSTERED]
    batches = [1] if args.quick else args.batches
    rows = []
    for name, c, n, k, size, pad in layers:
        model = layer_model(c, n, k, size, pad)
        for method in methods:
            for target in args.targets:
                new, report = ol.optimize(model, method=method, speedup=target, check=0)
                record = report.records[0]
                if record.status != "rewritten":
                    rows.append(
                        {
                            "layer": name,
                            "method": method,
                            "target": target,
                            "skipped": record.reason,
                        }
                    )
                    continue
                for batch in batches:
                    runs = args.runs if batch == 1 else max(10, args.runs // 2)
                    timing = bench(
                        [model, new], runs=runs, warmup=3, threads=args.threads or None, batch=batch
                    )
                    row = {
                        "layer": name,
                        "method": method,
                        "target": target,
                        "rank": record.rank,
                        "batch": batch,
                        "mac_ratio": record.macs_before / record.macs_after,
                        "speedup": timing["speedup"],
                        "dense_ms": timing["median_ms"][0],
                        "factored_ms": timing["median_ms"][1],
                    }
                    row["efficiency"] = row["speedup"] / row["mac_ratio"]
                    rows.append(row)
                    print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    head = f"{row['layer']:<20} {row['method']:<12} {row['target']:>4g}x"
    if "skipped" in row:
        return f"{head}  skipped: {row['skipped']}"
    rank = ",".join(map(str, row["rank"])) if isinstance(row["rank"], list) else str(row["rank"])
    return (
        f"{head}  rank {rank:>7}  batch {row['batch']}  MACs {row['mac_ratio']:5.2f}x"
        f"  measured {row['speedup']:5.2f}x  eff {row['efficiency']:4.2f}"
        f"  ({row['dense_ms']:.2f} -> {row['factored_ms']:.2f} ms)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        choices=list(CONV_PASSES),
        help="default: all conv methods but the clustered ones (benchmarks/denton.py)",
    )
    parser.add_argument("--targets", nargs="*", type=float, default=[2.0, 4.0, 8.0])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads; 0 = onnxruntime default"
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", nargs="*", help="only these layer names (see the table)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "layer_speed.json"))
    args = parser.parse_args()
    print(
        f"onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus, threads {args.threads or 'default'}"
    )
    start = time.time()
    rows = measure(args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "onnxruntime": ort.__version__,
                "threads": args.threads or "default",
                "seconds": time.time() - start,
                "rows": rows,
            },
            f,
            indent=1,
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
