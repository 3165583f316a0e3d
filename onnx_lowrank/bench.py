"""Latency in onnxruntime: warm-up, then the models run interleaved (A B B A ...), medians."""

from __future__ import annotations

import statistics
import time

import onnx
import onnxruntime as ort

from .runtime import random_inputs, session


def bench(
    models: list[onnx.ModelProto],
    provider: str = "cpu",
    runs: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    batch: int | None = None,
    seed: int = 0,
    feeds: list[dict] | None = None,
) -> dict:
    """Median latency (ms) of each model and, for two, the speedup of the second.

    The models are timed side by side in one loop, in alternating order, on a rotation of
    three random inputs (or the given `feeds`: real inputs, where a model's speed depends on
    its values, e.g. a softmax whose exponentials underflow), so machine noise hits them
    alike."""
    sessions = [session(m, provider, optimize=True, threads=threads) for m in models]
    feeds = feeds or random_inputs(models[0], 3, seed=seed, batch=batch)
    for sess in sessions:
        for i in range(warmup):
            sess.run(None, feeds[i % len(feeds)])
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for i in range(runs):
        for k in order if i % 2 == 0 else order[::-1]:
            feed = feeds[i % len(feeds)]
            start = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append((time.perf_counter() - start) * 1e3)
    medians = [statistics.median(t) for t in times]
    result = {
        "provider": provider,
        "onnxruntime": ort.__version__,
        "runs": runs,
        "warmup": warmup,
        "threads": threads or "default",
        "batch": batch or 1,
        "median_ms": medians,
        "min_ms": [min(t) for t in times],
    }
    if len(medians) == 2:
        result["speedup"] = medians[0] / medians[1]
    return result
