"""Measured latency of single layers and of candidate chains, cached per machine and provider.

FLOPs are not speed: depthwise and grouped convs, odd channel counts and small maps run far
below their FLOP share in onnxruntime, and CPU and CUDA differ. So each candidate chain is timed
as a small onnxruntime model of the layer's real shapes (random weights), and the median is kept
in a JSON table under ~/.cache/onnx-lowrank/, keyed by the op shapes, the input shape, the batch
and threads; the file is per machine, provider and onnxruntime version, so a change of any of
them starts a new table.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from .cost import ConvShape
from .runtime import session

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "onnx-lowrank")


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
            nodes.append(helper.make_node("Conv", [current, name], [out], **attrs))
        else:
            w = rng.standard_normal((op.inner, op.outer)).astype(np.float32) * 0.1
            nodes.append(helper.make_node("MatMul", [current, name], [out]))
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


def time_model(
    model: onnx.ModelProto,
    in_shape,
    provider: str,
    threads: int | None,
    runs: int = 15,
    warmup: int = 3,
) -> float:
    """Median latency (ms) of one model on random inputs."""
    sess = session(model, provider, optimize=True, threads=threads)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal(in_shape).astype(np.float32)} for _ in range(3)]
    for i in range(warmup):
        sess.run(None, feeds[i % 3])
    times = []
    for i in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds[i % 3])
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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
        ident = f"{machine_id()}|{provider}"
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
        self.entries[key] = time_model(model, in_shape, self.provider, self.threads, self.runs)
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
