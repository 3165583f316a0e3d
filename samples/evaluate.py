"""Top-1 accuracy of an ONNX classifier on a test.npz in onnxruntime (numpy + onnxruntime only).

    python samples/evaluate.py samples/charnet/model.onnx samples/charnet/test.npz

The npz holds `x`, the model's input exactly as fed, and `y`, integer labels. The model's first
input is fed and its first output taken as logits (argmax over axis 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def accuracy(model: str | Path, data: str | Path, batch: int = 512) -> tuple[float, int]:
    """(top-1 accuracy, number of samples) of model on the x/y arrays stored in data."""
    with np.load(data) as arrays:
        x, y = arrays["x"], arrays["y"]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    predictions = [
        session.run(None, {name: x[i : i + batch]})[0].argmax(axis=1)
        for i in range(0, len(x), batch)
    ]
    return float((np.concatenate(predictions) == y).mean()), len(y)


def main(argv: list[str] | None = None) -> int:
    """Print `top-1 accuracy: 0.xxxx (n=N)` for the model and test set given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="ONNX model file")
    parser.add_argument("data", type=Path, help="npz with x (model input) and y (labels)")
    args = parser.parse_args(argv)
    value, count = accuracy(args.model, args.data)
    print(f"top-1 accuracy: {value:.4f} (n={count})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
