"""Compare two models in onnxruntime: output error, top-1 agreement, and accuracy with labels."""

from __future__ import annotations

import numpy as np
import onnx

from .runtime import session


def run_all(
    model: onnx.ModelProto, feeds: list[dict], provider: str = "cpu", optimize: bool = True
) -> list[list[np.ndarray]]:
    """The model's outputs for each feed."""
    sess = session(model, provider, optimize)
    return [sess.run(None, feed) for feed in feeds]


def compare(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    feeds: list[dict],
    labels: np.ndarray | None = None,
    provider: str = "cpu",
    optimize: bool = True,
) -> dict:
    """Max absolute/relative output error, top-1 agreement on axis 1, and accuracy of both
    models on the first output when labels are given."""
    ref = run_all(reference, feeds, provider, optimize)
    new = run_all(candidate, feeds, provider, optimize)
    abs_err, rel_err, agree, total = 0.0, 0.0, 0, 0
    for outs_a, outs_b in zip(ref, new):
        for a, b in zip(outs_a, outs_b):
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            err = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
            scale = float(np.max(np.abs(a64))) if a64.size else 0.0
            abs_err, rel_err = max(abs_err, err), max(rel_err, err / scale if scale else err)
        first_a, first_b = outs_a[0], outs_b[0]
        if first_a.ndim >= 2 and first_a.shape[1] > 1:
            agree += int(np.sum(first_a.argmax(1) == first_b.argmax(1)))
            total += first_a.argmax(1).size
    result = {
        "samples": sum(len(next(iter(f.values()))) for f in feeds),
        "max_abs_error": abs_err,
        "max_rel_error": rel_err,
        "top1_agreement": agree / total if total else None,
    }
    if labels is not None:
        result["accuracy_reference"] = _accuracy(ref, labels)
        result["accuracy_candidate"] = _accuracy(new, labels)
    return result


def _accuracy(outputs: list[list[np.ndarray]], labels: np.ndarray) -> float:
    predictions = np.concatenate([o[0].reshape(len(o[0]), -1).argmax(1) for o in outputs])
    return float(np.mean(predictions == np.asarray(labels).reshape(-1)))
