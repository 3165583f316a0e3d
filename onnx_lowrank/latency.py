"""Measured latency of single layers and of candidate chains, cached per machine and provider.

FLOPs are not speed: depthwise and grouped convs, odd channel counts and small maps run far
below their FLOP share in onnxruntime, and CPU and CUDA differ. So each candidate chain is timed
as a small onnxruntime model of the layer's real shapes (random weights; the sum of its kernels'
times in onnxruntime's profile, not the call's wall time), and the median is kept
in a JSON table under ~/.cache/onnx-lowrank/, keyed by the op shapes, the input shape, the batch
and threads; the file is per machine (CPU model and vector extension, cores), provider and
onnxruntime version, so a change of any of them starts a new table.
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
CPUINFO = "/proc/cpuinfo"
EDGE_KERNELS = ("ReorderInput", "ReorderOutput")  # layout changes at a one-layer model's edges
FLOAT_BYTES = 4  # weights are timed, and factored weights written, as float32
# the weight-streaming curve: 16 MatMuls sharing one weight or with one each, at these totals
STREAM_COUNT, STREAM_RUNS = 16, 1000
STREAM_MB = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


@dataclass(frozen=True)
class MatMulShape:
    """A product with a constant (inner x outer) weight, for fully connected chains."""

    inner: int
    outer: int


def machine_id() -> str:
    """What the timings depend on besides the provider: CPU model, core count, ORT version,
    and the widest x86 vector extension the CPU offers. onnxruntime's NCHWc convs block
    channels by 16 with AVX-512 and by 8 with AVX2, which moves which ranks run fast, and a
    virtual machine's model name ("AMD EPYC") need not tell the two apart."""
    fields: dict[str, str] = {}
    try:
        with open(CPUINFO, encoding="utf-8") as f:
            for line in f:  # the first processor's fields
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    flags = fields.get("flags", "").split()
    simd = next((x for x in ("avx512f", "avx2", "avx") if x in flags), "other")
    return f"{cpu}|{os.cpu_count()}|onnxruntime {ort.__version__}|{simd}"


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


@dataclass(frozen=True)
class StreamCurve:
    """What a model's weights cost to stream on each run, by their total size: the extra
    milliseconds of a model whose weights total `bytes` over the same arithmetic on weights
    that stay in the core's cache. Measured points (bytes, ms), linear between them, the last
    segment's slope beyond; 0 at 0 bytes. A chain timed alone keeps its weights in the cache;
    inside a model whose weights do not fit, every run streams them again — and on this
    kind of machine that costs next to nothing below about 1 MB and ~0.03-0.07 ms per MB
    above (latency_model.json), so one cost per byte cannot fit both sides of the knee."""

    points: tuple[tuple[float, float], ...]

    def ms(self, nbytes: float) -> float:
        sizes = [0.0] + [b for b, _ in self.points]
        costs = [0.0] + [c for _, c in self.points]
        if nbytes <= sizes[-1] or len(sizes) < 2:
            return float(np.interp(nbytes, sizes, costs))
        slope = (costs[-1] - costs[-2]) / (sizes[-1] - sizes[-2])
        return costs[-1] + slope * (nbytes - sizes[-1])

    def describe(self) -> str:
        """'0.004 ms at 1 MB, 0.054 at 2, 0.28 at 8' (the points at whole megabytes)."""
        parts = [(b / 1e6, c) for b, c in self.points if abs(b / 1e6 - round(b / 1e6)) < 0.1]
        return ", ".join(
            f"{c:.2g} ms at {mb:.0f} MB" if i == 0 else f"{c:.2g} at {mb:.0f}"
            for i, (mb, c) in enumerate(parts)
        )


def _stream_chain(n: int, distinct: bool) -> onnx.ModelProto:
    """STREAM_COUNT MatMuls of a (1, n) row by n x n weights: one weight shared by all, or one
    each (the same arithmetic, 1 or STREAM_COUNT weights' bytes)."""
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
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
        self.entries: dict[str, float | list] = {}  # chain ms; the streaming curve
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

    def stream_curve(self, runs: int = STREAM_RUNS) -> StreamCurve:
        """The machine's weight-streaming cost by total weight size (StreamCurve): at each size
        of STREAM_MB, two chains of the same STREAM_COUNT MatMuls at batch 1, one with a weight
        of its own per MatMul (that size in all), one reusing one weight (1/16 of it), timed
        side by side; the difference, made non-decreasing in size. Cached like the chains."""
        sizes = ",".join(f"{mb:g}" for mb in STREAM_MB)
        key = f"stream-curve;k={STREAM_COUNT};mb={sizes};threads={self.threads or 0}"
        if key not in self.entries:
            points, floor = [], 0.0
            for mb in STREAM_MB:
                n = int(round(np.sqrt(mb * 1e6 / (FLOAT_BYTES * STREAM_COUNT))))
                models = [_stream_chain(n, distinct) for distinct in (False, True)]
                shared, distinct = bench(models, self.provider, runs=runs, threads=self.threads)[
                    "median_ms"
                ]
                floor = max(floor, distinct - shared)
                points.append([FLOAT_BYTES * STREAM_COUNT * n * n, floor])
            self.entries[key] = points
        return StreamCurve(tuple((float(b), float(c)) for b, c in self.entries[key]))

    def save(self) -> None:
        """Write the table (atomically) so the next run reuses it."""
        if not self.path:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"machine": self.machine, "entries": self.entries}, f)
        os.replace(tmp, self.path)
