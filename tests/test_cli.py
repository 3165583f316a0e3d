"""The real entry point in a subprocess: outputs, reports, exit codes, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from modelgen import conv_model

EXE = [sys.executable, "-m", "onnx_lowrank.cli"]


def cli(*args, cwd=None):
    return subprocess.run(
        [*EXE, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    # a kernel close to separable rank 6, plus noise: energy targets then pay
    v, h = rng.standard_normal((6, 16, 5)), rng.standard_normal((32, 6, 5))
    w = (np.einsum("kcy,nkx->ncyx", v, h) + 0.05 * rng.standard_normal((32, 16, 5, 5))).astype(
        np.float32
    )
    path = tmp_path_factory.mktemp("m") / "model.onnx"
    onnx.save(conv_model(w, ["N", 16, 20, 20], {"pads": [2, 2, 2, 2]}), path)
    return path


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_help_lists_commands_and_flags():
    out = cli("--help")
    assert out.returncode == 0 and all(
        c in out.stdout for c in ("optimize", "inspect", "compare", "bench")
    )
    out = cli("optimize", "--help")
    for flag in (
        "--method",
        "--rank",
        "--ranks",
        "--energy",
        "--max-error",
        "--speedup",
        "--rank-multiple",
        "--force",
        "--no-fc",
        "--input-shape",
        "--check",
        "--tolerance",
        "--report",
        "-q",
    ):
        assert flag in out.stdout


def test_optimize_writes_model_and_json_report(model_path, tmp_path):
    out_path, report = tmp_path / "out.onnx", tmp_path / "r.json"
    before = _digest(model_path)
    run = cli(
        "optimize",
        model_path,
        out_path,
        "--method",
        "separable",
        "--energy",
        "0.9",
        "--report",
        report,
    )
    assert run.returncode == 0, run.stderr
    assert "Layers" in run.stdout and "check on 2 random input(s)" in run.stdout
    onnx.checker.check_model(onnx.load(out_path))
    data = json.loads(report.read_text())
    assert data["layers"][0]["status"] == "rewritten" and data["totals"]["macs_after"] > 0
    assert _digest(model_path) == before


def test_quiet_prints_nothing(model_path, tmp_path):
    run = cli(
        "optimize", model_path, tmp_path / "o.onnx", "-q", "--method", "separable", "--rank", "4"
    )
    assert run.returncode == 0 and run.stdout == "" and run.stderr == ""


def test_tolerance_failure_exits_1_and_still_writes(model_path, tmp_path):
    out_path = tmp_path / "o.onnx"
    run = cli(
        "optimize",
        model_path,
        out_path,
        "--method",
        "separable",
        "--rank",
        "1",
        "--tolerance",
        "1e-6",
    )
    assert run.returncode == 1 and out_path.exists() and "check failed" in run.stderr


def _bad_cases(model_path, tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    out = tmp_path / "out.onnx"
    return {
        "missing": (tmp_path / "nope.onnx", out),
        "directory": (tmp_path, out),
        "text": (text, out),
        "truncated": (truncated, out),
        "empty": (empty, out),
        "missing_dir": (model_path, tmp_path / "no" / "such" / "out.onnx"),
        "same_path": (model_path, model_path),
        "energy": (model_path, out, "--energy", "1.5"),
        "rank0": (model_path, out, "--rank", "0"),
        "method": (model_path, out, "--method", "magic"),
        "input_shape": (model_path, out, "--input-shape", "nope:1,16,20,20"),
        "input_shape_syntax": (model_path, out, "--input-shape", "x:1,a,b"),
        "ranks": (model_path, out, "--ranks", "4"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "directory",
        "text",
        "truncated",
        "empty",
        "missing_dir",
        "same_path",
        "energy",
        "rank0",
        "method",
        "input_shape",
        "input_shape_syntax",
        "ranks",
    ],
)
def test_bad_input_is_one_line_exit_2_no_output(case, model_path, tmp_path):
    before = _digest(model_path)
    args = _bad_cases(model_path, tmp_path)[case]
    run = cli("optimize", *args)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "out.onnx").exists()
    assert _digest(model_path) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".onnx-lowrank")]


def test_inspect_compare_bench(model_path, tmp_path):
    run = cli("inspect", model_path, "--json", tmp_path / "i.json", "--plot", tmp_path / "s.png")
    assert run.returncode == 0 and "separable" in run.stdout
    assert (tmp_path / "s.png").stat().st_size > 0
    rows = json.loads((tmp_path / "i.json").read_text())
    assert rows[0]["energy_ranks"]["tucker2"]["0.9"][0] >= 1
    out_path = tmp_path / "o.onnx"
    assert (
        cli("optimize", model_path, out_path, "--method", "tucker2", "--rank", "8", "-q").returncode
        == 0
    )
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 16, 20, 20)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 32, 10))
    run = cli(
        "compare", model_path, out_path, "--data", tmp_path / "d.npz", "--json", tmp_path / "c.json"
    )
    assert run.returncode == 0 and "top-1 accuracy" in run.stdout
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["samples"] == 10 and 0 <= result["accuracy_candidate"] <= 1
    run = cli(
        "bench", model_path, out_path, "--runs", "3", "--warmup", "1", "--json", tmp_path / "b.json"
    )
    assert run.returncode == 0 and "speedup" in json.loads((tmp_path / "b.json").read_text())


def test_bench_cuda_missing_is_a_clear_error(model_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    run = cli("bench", model_path, "--provider", "cuda", "--runs", "1")
    assert run.returncode == 2 and "onnxruntime-gpu" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_optimize_with_calibration_data(model_path, tmp_path):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((16, 16, 20, 20)).astype(np.float32))
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    run = cli(
        "optimize",
        model_path,
        out,
        "--method",
        "separable",
        "--rank",
        "4",
        "--calibration",
        tmp_path / "cal.npz",
        "--calibration-size",
        "8",
        "--report",
        report,
    )
    assert run.returncode == 0, run.stderr
    assert "output err (calibration)" in run.stdout
    layer = json.loads(report.read_text())["layers"][0]
    assert (
        layer["fit"].startswith("data")
        and layer["output_error_after"] <= layer["output_error_before"]
    )
    assert json.loads(report.read_text())["config"]["calibration"]["size"] == 8


def test_bad_calibration_is_one_line(model_path, tmp_path):
    np.savez(tmp_path / "cal.npz", images=np.zeros((2, 16, 20, 20), np.float32))
    run = cli("optimize", model_path, tmp_path / "o.onnx", "--calibration", tmp_path / "cal.npz")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "no array for model input" in run.stderr and not (tmp_path / "o.onnx").exists()


def test_auto_plan_only_then_apply_the_plan(model_path, tmp_path):
    plan = tmp_path / "plan.json"
    run = cli(
        "optimize",
        model_path,
        plan,
        "--plan-only",
        "--speedup",
        "1.5",
        "--plot",
        tmp_path / "p.png",
    )
    assert run.returncode in (0, 1), run.stderr  # 1: the speedup was not reached on a busy box
    assert (tmp_path / "p.png").stat().st_size > 0
    run = cli("optimize", model_path, plan, "--plan-only", "--max-error", "0.1")
    assert run.returncode == 0, run.stderr
    data = json.loads(plan.read_text())
    assert data["layers"][0]["node"] == "conv" and data["target"]["kind"] == "error"
    chosen = data["layers"][0]["options"][data["layers"][0]["choice"]]
    assert chosen["error"] <= 0.1
    out = tmp_path / "o.onnx"
    run = cli("optimize", model_path, out, "--plan", plan, "--report", tmp_path / "r.json")
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    # measured per layer inside both models (onnxruntime's profiler), beside the prediction
    assert all(ms > 0 for ms in report["plan"]["layers"][0]["profiled_ms"])
    layer = report["layers"][0]
    assert (layer["method"], layer["rank"]) == (
        chosen["method"],
        chosen["rank"][0] if len(chosen["rank"]) == 1 else chosen["rank"],
    )


def test_auto_unreachable_speedup_exits_1_with_the_best_reached(model_path, tmp_path):
    run = cli("optimize", model_path, tmp_path / "o.onnx", "--speedup", "1000", "--check", "0")
    assert run.returncode == 1 and "not met: best measured" in run.stderr
    assert (tmp_path / "o.onnx").exists()


def test_auto_max_drop_keeps_the_measured_accuracy_within_the_limit(model_path, tmp_path):
    """--max-drop with a labelled --data on a small classifier (the module's conv, then a
    global average pool to 32 logits): the plan's accuracy drop, measured again here on the
    written model, is within the limit and the report says what the search measured."""
    model = onnx.load(model_path)
    model.graph.node.append(
        onnx.helper.make_node("ReduceMean", ["y"], ["logits"], axes=[2, 3], keepdims=0)
    )
    model.graph.output[0].CopyFrom(
        onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [None, 32])
    )
    classifier = tmp_path / "classifier.onnx"
    onnx.save(model, classifier)
    import onnxruntime as ort

    x = np.random.default_rng(5).standard_normal((96, 16, 20, 20)).astype(np.float32)

    def predict(path):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0].argmax(1)

    labels = predict(classifier)  # the original is 100% right on its own labels
    np.savez(tmp_path / "test.npz", x=x, y=labels)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    args = ["--max-drop", "10", "--data", tmp_path / "test.npz", "--check", "0"]
    run = cli("optimize", classifier, out, *args, "--report", report)
    assert run.returncode == 0, run.stderr
    data = json.loads(report.read_text())
    assert data["plan"]["target"] == {"kind": "drop", "value": 10.0}
    assert any("within 10" in note for note in data["plan"]["notes"])
    assert 100 * (1 - np.mean(predict(out) == labels)) <= 10.0
    assert data["layers"][0]["status"] == "rewritten"  # a plan that factors the conv exists
    run = cli("optimize", classifier, out, "--max-drop", "1")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
