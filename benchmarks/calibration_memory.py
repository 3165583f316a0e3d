"""Peak memory and time of a data-aware fit: 50 convs, 512 calibration images at 224 px.

Issue 6 asks that such a run fit in a few GB: the fit keeps accumulated statistics (Gram
matrices over sampled output positions), never all activations. This builds a plain 50-conv
network in code (a stride-2 stem to 112 px, then four stages of 3x3 convs at 16, 32, 64 and 128
channels, 112 to 14 px, stride-2 convs between them, global pooling and a 10-way Gemm), writes 512
random 224 px images as the calibration .npz (616 MB), and runs the real CLI on it in a child
process (`optimize --method channel-svd --speedup 2 --calibration ... --calibration-size 512`:
every conv factored at half its multiply-adds, the data fit, sequential), measuring the child's
peak resident memory (`ru_maxrss`) and wall time. The run without calibration (weight-only) is
measured the same way for comparison.

    python benchmarks/calibration_memory.py        # about 10 minutes on 2 cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy import RESULTS  # noqa: E402

IMAGES, SIZE = 512, 224
STAGES = ((16, 13), (32, 12), (64, 12), (128, 12))  # (channels, 3x3 convs), stride-2 convs between


def fifty_conv_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, x, c = [], [], "x", 3

    def conv(out: int, stride: int) -> None:
        nonlocal x, c
        name = f"conv{len(nodes) // 2}"
        w = (rng.standard_normal((out, c, 3, 3)) * np.sqrt(2.0 / (9 * c))).astype(np.float32)
        inits.extend(
            [
                numpy_helper.from_array(w, f"{name}.w"),
                numpy_helper.from_array(np.zeros(out, np.float32), f"{name}.b"),
            ]
        )
        attrs = {"pads": [1, 1, 1, 1], "strides": [stride, stride]}
        nodes.append(
            helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name, **attrs)
        )
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"]))
        x, c = f"{name}.relu", out

    conv(STAGES[0][0], 2)
    for i, (width, count) in enumerate(STAGES):
        if i:
            conv(width, 2)
        for _ in range(count - (1 if i else 0)):
            conv(width, 1)
    fc = (rng.standard_normal((c, 10)) / np.sqrt(c)).astype(np.float32)
    inits.append(numpy_helper.from_array(fc, "fc.w"))
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc.w"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "fifty_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def measure(args: list[str]) -> dict:
    """Wall time and peak RSS of one CLI run in a fresh child process."""
    code = (
        "import resource, sys; from onnx_lowrank.cli import main; rc = main(sys.argv[1:]); "
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
    )
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    lines = run.stdout.splitlines()
    rss = [line for line in lines if line.startswith("MAXRSS")]
    if run.returncode or not rss:
        raise SystemExit(f"optimize failed ({run.returncode}): {run.stderr.strip()[-500:]}")
    done = next(line for line in lines if line.startswith("wrote "))
    return {"seconds": seconds, "peak_rss_mb": int(rss[-1].split()[1]) / 1024, "result": done}


def main() -> int:
    model = fifty_conv_model()
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fifty.onnx")
        onnx.save(model, path)
        images = np.random.default_rng(1).random((IMAGES, 3, SIZE, SIZE), dtype=np.float32)
        cal = os.path.join(tmp, "calibration.npz")
        np.savez(cal, x=images)
        del images
        out = os.path.join(tmp, "out.onnx")
        base = ["optimize", path, out, "--method", "channel-svd", "--speedup", "2"]
        rows = {
            "weight-only": measure(base),
            "data fit, 512 images": measure(
                [*base, "--calibration", cal, "--calibration-size", str(IMAGES)]
            ),
        }
    print(f"{convs} convs, {IMAGES} calibration images at {SIZE} px (channel-svd, 2x fewer MACs)")
    for label, row in rows.items():
        print(f"  {label:22} peak RSS {row['peak_rss_mb']:7.0f} MB   {row['seconds']:6.0f} s")
        print(f"    {row['result']}")
    out = os.path.join(RESULTS, "calibration_memory.json")
    with open(out, "w") as f:
        json.dump(
            {
                "command": "python benchmarks/calibration_memory.py",
                "convs": convs,
                "images": IMAGES,
                "size": SIZE,
                "stages": STAGES,
                "rows": rows,
            },
            f,
            indent=1,
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
