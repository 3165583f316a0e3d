"""The sample models in samples/: valid ONNX, run in onnxruntime, reach their stated accuracy.

Accuracy is checked by running the evaluate commands of samples/README.md as written, against
the floor each sample's README states, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
# name -> (input height/width, classes, accuracy floor stated in samples/<name>/README.md)
MODELS = {"charnet": (24, 36, 0.95), "digits": (28, 10, 0.97)}


def _session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(SAMPLES / name / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def _test_set(name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(SAMPLES / name / "test.npz") as arrays:
        return arrays["x"], arrays["y"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_is_valid_onnx(name: str) -> None:
    model = onnx.load(str(SAMPLES / name / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert {"Conv"} <= {node.op_type for node in model.graph.node}
    assert "BatchNormalization" not in {node.op_type for node in model.graph.node}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_test_set_matches_model_input(name: str) -> None:
    size, classes, _ = MODELS[name]
    x, y = _test_set(name)
    assert x.dtype == np.float32 and x.shape[1:] == (1, size, size)
    assert y.dtype == np.int64 and y.shape == (len(x),)
    assert set(np.unique(y)) == set(range(classes))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("batch", [1, 7])
def test_runs_with_dynamic_batch(name: str, batch: int) -> None:
    size, classes, _ = MODELS[name]
    x, _ = _test_set(name)
    logits = _session(name).run(["logits"], {"input": x[:batch]})[0]
    assert logits.shape == (batch, classes) and np.isfinite(logits).all()


def _readme_commands() -> list[str]:
    """The `python samples/evaluate.py ...` lines of samples/README.md."""
    text = (SAMPLES / "README.md").read_text()
    return re.findall(r"^(python samples/evaluate\.py .+)$", text, flags=re.MULTILINE)


def test_readme_lists_one_evaluate_command_per_model() -> None:
    commands = _readme_commands()
    for name in MODELS:
        assert sum(f"samples/{name}/model.onnx" in command for command in commands) == 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_readme_command_prints_accuracy_above_floor(name: str) -> None:
    """Run the README's evaluate line as written; its accuracy must reach the README's floor."""
    _, _, floor = MODELS[name]
    assert f"floor: {floor:.2f}" in (SAMPLES / name / "README.md").read_text()
    (command,) = [c for c in _readme_commands() if f"samples/{name}/model.onnx" in c]
    argv = [sys.executable, *shlex.split(command)[1:]]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    match = re.fullmatch(r"top-1 accuracy: (\d\.\d{4}) \(n=(\d+)\)\n", result.stdout)
    assert match, result.stdout
    assert int(match.group(2)) == len(_test_set(name)[1])
    assert float(match.group(1)) >= floor
