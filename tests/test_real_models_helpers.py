"""The real-model benchmark's helpers: YOLOv8 decoding, NMS, matching, OCR agreement (no network,
no model files)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
yolo = pytest.importorskip("realmodels.yolo")
ocr = pytest.importorskip("realmodels.ocr")


def _output(boxes: list[tuple[float, float, float, float, int, float]], classes: int = 3):
    """A (1, 4 + classes, anchors) YOLOv8 output holding the given cx, cy, w, h, class, score."""
    out = np.zeros((1, 4 + classes, len(boxes)), np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(boxes):
        out[0, :4, i] = cx, cy, w, h
        out[0, 4 + cls, i] = score
    return out


def test_decode_thresholds_and_suppresses_per_class():
    out = _output(
        [
            (50, 50, 20, 20, 0, 0.9),
            (51, 50, 20, 20, 0, 0.8),  # overlaps the first, same class: suppressed
            (51, 50, 20, 20, 1, 0.7),  # same place, other class: kept
            (200, 200, 10, 10, 2, 0.1),  # below the confidence threshold
        ]
    )
    found = yolo.decode(out)
    assert [(c, round(s, 2)) for c, s, _ in found] == [(0, 0.9), (1, 0.7)]
    np.testing.assert_allclose(found[0][2], [40, 40, 60, 60])


def test_match_requires_class_score_and_overlap():
    box = np.array([0, 0, 10, 10], np.float32)
    reference = [(0, 0.9, box), (1, 0.5, box)]
    assert yolo.match(reference, reference) == (2, 2, 2)
    assert yolo.match(reference, [(0, 0.8, box)]) == (0, 2, 1)  # score off by 0.1
    assert yolo.match(reference, [(0, 0.88, box + 8)]) == (0, 2, 1)  # IoU too small
    assert yolo.match(reference, [(2, 0.9, box)]) == (0, 2, 1)  # other class


def test_letterbox_shape_and_range():
    image = np.full((40, 80, 3), 255, np.uint8)
    x = yolo.letterbox(image, 32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    assert x[0, :, 0, 0] == pytest.approx(114 / 255) and x[0, :, 16, 16] == pytest.approx(1.0)


def test_edit_distance_and_agreement():
    assert ocr.edit_distance("kitten", "sitting") == 3
    box = np.array([0, 0, 100, 20], np.float32)
    reference = [(box, "hello"), (box + 40, "world")]
    assert ocr.agreement(reference, reference) == (2, 2, 0, 10)
    assert ocr.agreement(reference, [(box, "hallo")]) == (0, 2, 6, 10)


def test_denormal_weights_are_counted_and_flushed():
    import onnx
    from onnx import helper, numpy_helper

    real_models = pytest.importorskip("real_models")
    w = np.array([1.0, 1e-40, -3e-39, 0.0, 2e-38], np.float32)  # two denormals
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [5])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph)
    assert real_models.denormal_count(model) == 2
    flushed = real_models.flush_denormals(model)
    assert real_models.denormal_count(flushed) == 0
    np.testing.assert_array_equal(
        numpy_helper.to_array(flushed.graph.initializer[0]), np.where(np.abs(w) < 1.1e-38, 0, w)
    )
    assert real_models.denormal_count(model) == 2  # the input is untouched
