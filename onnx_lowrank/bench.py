"""Latency in onnxruntime: warm-up, then the models take turns in blocks (A B B A ...), medians."""

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

    The models take turns in blocks of consecutive runs, in alternating order (A B B A ...),
    and the first run of each block is not counted: each model is timed as a user runs it,
    back to back with its own weights in the caches, while drift on the machine hits all of
    them alike. (Alternating every single run instead times each model just after the other
    has evicted its weights: a compressed charnet ran 0.105 ms after the original, 0.072 ms
    after itself; the penalty falls on the small model.) Inputs rotate among three random
    arrays, or the given `feeds` (real inputs, where a model's speed depends on its values,
    e.g. a softmax whose exponentials underflow)."""
    sessions = [session(m, provider, optimize=True, threads=threads) for m in models]
    feeds = feeds or random_inputs(models[0], 3, seed=seed, batch=batch)
    for sess in sessions:
        for i in range(warmup):
            sess.run(None, feeds[i % len(feeds)])
    per_block = block_size(runs)
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    turn = 0
    while min(len(t) for t in times) < runs:
        for k in order if turn % 2 == 0 else order[::-1]:
            for i in range(per_block + 1):
                feed = feeds[(len(times[k]) + i) % len(feeds)]
                start = time.perf_counter()
                sessions[k].run(None, feed)
                if i:  # the block's first run follows another model: not counted
                    times[k].append((time.perf_counter() - start) * 1e3)
        turn += 1
    times = [t[:runs] for t in times]
    medians = [statistics.median(t) for t in times]
    result = {
        "provider": provider,
        "onnxruntime": ort.__version__,
        "runs": runs,
        "warmup": warmup,
        "block": per_block,
        "threads": threads or "default",
        "batch": batch or 1,
        "median_ms": medians,
        "min_ms": [min(t) for t in times],
    }
    if len(medians) == 2:
        result["speedup"] = medians[0] / medians[1]
    return result


def block_size(runs: int) -> int:
    """Counted runs per block: up to 10, and at least four blocks per model (A B B A)."""
    return max(1, min(10, runs // 4))
