"""Measured latency of single layers and of candidate chains, cached per machine and provider.

FLOPs are not speed: depthwise and grouped convs, odd channel counts and small maps run far
below their FLOP share in onnxruntime, and CPU and CUDA differ. So each candidate chain is timed
as a small onnxruntime model of the layer's real shapes (random weights; the sum of its kernels'
times in onnxruntime's profile, not the call's wall time), and the median is kept
in a JSON table under ~/.cache/onnx-lowrank/, keyed by the op shapes, the input shape, the batch
and threads; the file is per machine, provider and onnxruntime version, so a change of any of
them starts a new table.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .bench import bench
from .cost import ConvShape
from .profile import kernel_times

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "onnx-lowrank")
EDGE_KERNELS = ("ReorderInput", "ReorderOutput")  # layout changes at a one-layer model's edges
FLOAT_BYTES = 4  # weights are timed, and factored weights written, as float32
STREAM_SIZE, STREAM_COUNT, STREAM_RUNS = 362, 16, 1000  # 0.5 MB weights, 1 or 16 of them


@dataclass(frozen=True)
class MatMulShape:
    """A product with a constant (inner x outer) weight, for fully connected chains."""

    inner: int
    outer: int


def machine_id() -> str:
    """What the timings depend on besides the provider: CPU model, core count, ORT version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    except OSError:
        pass
    return f"{cpu}|{os.cpu_count()}|onnxruntime {ort.__version__}"


def chain_model(ops: list, in_shape: tuple[int, ...], seed: int = 0) -> onnx.ModelProto:
    """A model running `ops` (ConvShape or MatMulShape) in sequence on an input of `in_shape`."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i, op in enumerate(ops):
        name, out = f"w{i}", f"t{i}"
        if isinstance(op, ConvShape):
            w = rng.standard_normal(op.weight_shape).astype(np.float32) * 0.1
            g = op.geometry
            attrs = {
                "strides": list(g.strides),
                "dilations": list(g.dilations),
                "pads": list(g.pads),
                "group": g.group,
            }
            nodes.append(helper.make_node("Conv", [current, name], [out], name=out, **attrs))
        else:
            w = rng.standard_normal((op.inner, op.outer)).astype(np.float32) * 0.1
            nodes.append(helper.make_node("MatMul", [current, name], [out], name=out))
        inits.append(numpy_helper.from_array(w, name))
        current = out
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _stream_chain(distinct: bool) -> onnx.ModelProto:
    """STREAM_COUNT MatMuls of a (1, n) row by n x n weights: one weight shared by all, or one
    each (the same arithmetic, 1 or STREAM_COUNT weights' bytes)."""
    rng = np.random.default_rng(0)
    n, nodes, inits, current = STREAM_SIZE, [], [], "x"
    for i in range(STREAM_COUNT):
        name = f"w{i if distinct else 0}"
        if distinct or i == 0:
            w = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
            inits.append(numpy_helper.from_array(w, name))
        nodes.append(helper.make_node("MatMul", [current, name], [f"t{i}"]))
        current = f"t{i}"
    graph = helper.make_graph(
        nodes,
        "stream",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, n])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def kernel_time(
    model: onnx.ModelProto, provider: str, threads: int | None, runs: int = 15
) -> float:
    """Milliseconds per run of the model's own kernels (onnxruntime's profiler): without the
    per-call overhead and the layout reorders at the model's edges, which a layer inside a
    whole model does not pay, and which would make small chains look slow next to the layer."""
    times = kernel_times(model, provider, threads=threads, runs=runs)
    return sum(ms for kernel, ms in times.items() if not kernel.startswith(EDGE_KERNELS))


class LatencyTable:
    """Measured chain latencies, loaded from and saved to the cache file of this machine."""

    def __init__(
        self,
        provider: str = "cpu",
        threads: int | None = None,
        cache_dir: str | None = CACHE_DIR,
        runs: int = 15,
    ):
        self.provider, self.threads, self.runs = provider, threads, runs
        ident = f"{machine_id()}|{provider}|kernel time, all kernels"
        self.path = None
        if cache_dir:
            digest = hashlib.sha1(ident.encode()).hexdigest()[:12]
            self.path = os.path.join(cache_dir, f"latency-{provider}-{digest}.json")
        self.entries: dict[str, float] = {}
        self.machine = ident
        self.hits = self.misses = 0
        if self.path and os.path.exists(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    data = json.load(f)
                if data.get("machine") == ident:
                    self.entries = data.get("entries", {})
            except (OSError, ValueError):
                self.entries = {}

    def key(self, ops: list, in_shape: tuple[int, ...]) -> str:
        parts = [f"in={'x'.join(map(str, in_shape))}", f"threads={self.threads or 0}"]
        for op in ops:
            if isinstance(op, ConvShape):
                g = op.geometry
                parts.append(f"conv{op.weight_shape}s{g.strides}d{g.dilations}p{g.pads}g{g.group}")
            else:
                parts.append(f"mm{op.inner}x{op.outer}")
        return ";".join(parts)

    def measure(self, ops: list, in_shape: tuple[int, ...]) -> float:
        """Median ms of the chain, from the cache when it was timed before."""
        key = self.key(ops, in_shape)
        if key in self.entries:
            self.hits += 1
            return self.entries[key]
        self.misses += 1
        model = chain_model(ops, in_shape)
        self.entries[key] = kernel_time(model, self.provider, self.threads, self.runs)
        return self.entries[key]

    def stream_cost(self, runs: int = STREAM_RUNS) -> float:
        """Milliseconds per byte of weights a model reads from beyond the core's cache on each
        run: two chains of the same MatMuls at batch 1, one reusing one weight (0.5 MB), one
        with a weight of its own per MatMul (8.4 MB), timed side by side; the difference per
        byte (at least 0). Cached like the chains. A chain timed alone keeps its weights in
        the cache; inside a model whose weights do not fit, every run streams them again, and
        the more weights, the more the other layers' are evicted too."""
        key = f"stream;n={STREAM_SIZE};k={STREAM_COUNT};threads={self.threads or 0}"
        if key not in self.entries:
            models = [_stream_chain(distinct) for distinct in (False, True)]
            shared, distinct = bench(models, self.provider, runs=runs, threads=self.threads)[
                "median_ms"
            ]
            extra = FLOAT_BYTES * STREAM_SIZE**2 * (STREAM_COUNT - 1)
            self.entries[key] = max(0.0, (distinct - shared) / extra)
        return self.entries[key]

    def save(self) -> None:
        """Write the table (atomically) so the next run reuses it."""
        if not self.path:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"machine": self.machine, "entries": self.entries}, f)
        os.replace(tmp, self.path)
