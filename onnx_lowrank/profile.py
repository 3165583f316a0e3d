"""Measured latency per layer inside a whole model, from onnxruntime's own profiler.

onnxruntime renames and fuses nodes when it optimizes a graph (Conv+Relu become one kernel, the
CPU provider's NCHWc pass names a node after its output tensor plus `_nchwc`), so each profiled
kernel is traced back to a node of the model we gave it: by node name, else by the tensor its
name comes from; a fused activation is walked back to the Conv, Gemm or MatMul that feeds it.
A layer's time is the sum over the nodes named after it (the layer's own node, or the chain
`<layer>/<method>/<i>` a pass put in its place). Kernels that belong to no layer (layout
reorders, the rest of the graph) are reported together as "other"."""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict

import numpy as np
import onnx

from .runtime import random_inputs, session

FUSED_INTO_PRODUCER = {"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "Tanh", "Add"}
COMPUTE_OPS = {"Conv", "Gemm", "MatMul", "ConvTranspose"}
SUFFIXES = ("_nchwc",)


def kernel_times(
    model: onnx.ModelProto,
    provider: str = "cpu",
    batch: int | None = None,
    threads: int | None = None,
    runs: int = 30,
    seed: int = 0,
    feed: dict | None = None,
) -> dict[str, float]:
    """Median milliseconds per run of every kernel onnxruntime ran, by its profiled name.
    `batch` sets the random inputs' first dim (None: a free one is 1, a fixed one stays);
    `feed` gives real inputs instead."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = session(model, provider, threads=threads, profile_prefix=os.path.join(tmp, "p"))
        feed = feed or random_inputs(model, 1, seed, batch)[0]
        for _ in range(3):
            sess.run(None, feed)  # warm-up runs are profiled too: dropped below
        for _ in range(runs):
            sess.run(None, feed)
        with open(sess.end_profiling(), encoding="utf-8") as f:
            events = json.load(f)
    durations: dict[str, list[float]] = defaultdict(list)
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            durations[name[: -len("_kernel_time")]].append(event["dur"] / 1000.0)
    # a kernel runs once per run (kernels sharing a name, several times): drop the warm-up
    return {
        kernel: float(np.median(values[-runs:])) * max(1, len(values) // (runs + 3))
        for kernel, values in durations.items()
    }


def node_times(model: onnx.ModelProto, kernels: dict[str, float]) -> dict[str, float]:
    """`kernels` (kernel_times of `model`) summed per node of `model` that onnxruntime ran a
    kernel for (fused kernels count for the node they are traced back to); "other" for the
    rest."""
    resolve = _resolver(model)
    times: dict[str, float] = defaultdict(float)
    for kernel, ms in kernels.items():
        times[resolve(kernel)] += ms
    return dict(times)


def layer_times(times: dict[str, float], layers: list[str]) -> tuple[dict[str, float], float]:
    """Per layer name, the summed time of its nodes; and the time of everything else."""
    out = dict.fromkeys(layers, 0.0)
    other = 0.0
    for node, ms in times.items():
        owner = next((name for name in layers if node == name or node.startswith(name + "/")), None)
        if owner is None:
            other += ms
        else:
            out[owner] += ms
    return out, other


def _resolver(model: onnx.ModelProto):
    """kernel name -> the model node it stands for ("other" when none)."""
    by_name = {n.name: n for n in model.graph.node if n.name}
    producer = {out: n for n in model.graph.node for out in n.output}

    def back_to_compute(node: onnx.NodeProto) -> onnx.NodeProto:
        for _ in range(4):  # Relu after Add after Conv, at most
            if node.op_type not in FUSED_INTO_PRODUCER:
                break
            feeders = [producer[i] for i in node.input if i in producer]
            compute = [f for f in feeders if f.op_type in COMPUTE_OPS | FUSED_INTO_PRODUCER]
            if not compute:
                break
            node = compute[0]
        return node

    def resolve(kernel: str) -> str:
        node = by_name.get(kernel)
        if node is None:
            tensor = kernel
            for suffix in SUFFIXES:
                tensor = tensor.removesuffix(suffix)
            node = producer.get(tensor)
        if node is None:
            return "other"
        node = back_to_compute(node)
        return node.name or node.output[0]

    return resolve
