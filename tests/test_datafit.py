"""Data-aware fitting: whitening, least-squares refit, bias correction, sequential mode, and
calibration loading errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from modelgen import conv_model, run

import onnx_lowrank as ol
from onnx_lowrank.config import Calibration, Preprocess
from onnx_lowrank.decompose import metrics, svd

RNG = np.random.default_rng(0)
W = RNG.standard_normal((32, 16, 3, 3)).astype(np.float32)
MODEL = conv_model(
    W, ["N", 16, 8, 8], {"pads": [1, 1, 1, 1]}, RNG.standard_normal(32).astype(np.float32)
)


@pytest.fixture(scope="module")
def subspace_data(tmp_path_factory):
    """Inputs whose 16 channels mix 3 latent maps: a low-dimensional subspace."""
    latent = RNG.standard_normal((96, 3, 8, 8))
    x = np.einsum("blhw,cl->bchw", latent, RNG.standard_normal((16, 3))).astype(np.float32)
    path = tmp_path_factory.mktemp("cal") / "cal.npz"
    np.savez(path, x=x)
    return str(path), x


def _fit(path, method="separable", fit="data", whiten=True, **options):
    out, report = ol.optimize(
        MODEL,
        method=method,
        check=0,
        rank_multiple=1,
        calibration=Calibration(path, fit=fit, whiten=whiten),
        **options,
    )
    return out, report.records[0]


@pytest.mark.parametrize("groups", [1, 2])
def test_identity_whitening_equals_weight_only_fit(groups):
    w = RNG.standard_normal((8, 6 // groups, 3, 3))
    eye = [np.eye(6 // groups * 9)] * groups
    a, b = metrics.whitened_channel_svd(w, 3, eye, groups), svd.channel_svd(w, 3, groups)
    np.testing.assert_allclose(a.reconstruct(), b.reconstruct(), atol=1e-5)
    eye = [np.eye(6 // groups * 3)] * groups
    a, b = metrics.whitened_separable(w, 4, eye, groups), svd.spatial_separable(w, 4, groups)
    np.testing.assert_allclose(a.reconstruct(), b.reconstruct(), atol=1e-5)


def _geometry(groups):
    from onnx_lowrank.graph import ConvGeometry

    return ConvGeometry((3, 3), (1, 1), (1, 1), (0, 0, 0, 0), groups)


@pytest.mark.parametrize("method,groups", [("tucker2", 1), ("tucker2", 2), ("cp", 1)])
def test_identity_whitening_of_a_pointwise_first_chain_equals_the_weight_fit(method, groups):
    """tucker2 and cp open with a 1x1 conv: whitened on identity input-channel moments, the
    chain is the weight-only fit."""
    from onnx_lowrank.passes import CONV_PASSES
    from onnx_lowrank.passes.base import ConvLayer

    w = np.random.default_rng(1).standard_normal((8, 6 // groups, 3, 3)).astype(np.float32)
    layer = ConvLayer(None, w, None, _geometry(groups), [8, 8], True)
    rank = (3, 4) if method == "tucker2" else (5,)
    plain = CONV_PASSES[method](seed=0).factor(layer, rank).reconstruct()
    layer.moments = [np.eye(6 // groups)] * groups
    white = CONV_PASSES[method](seed=0).factor(layer, rank).reconstruct()
    if method == "tucker2":
        np.testing.assert_allclose(white, plain, atol=1e-5)
    else:  # a low-rank CP optimum is flat: the same error, not always the same factors
        assert abs(svd.relative_error(white, w) - svd.relative_error(plain, w)) < 1e-5


def test_whitened_pointwise_first_chains_are_exact_at_full_rank():
    from onnx_lowrank.passes import CONV_PASSES
    from onnx_lowrank.passes.base import ConvLayer

    w = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    a = RNG.standard_normal((4, 4))
    layer = ConvLayer(None, w, None, _geometry(1), [8, 8], True, [a @ a.T])
    chain = CONV_PASSES["tucker2"](seed=0).factor(layer, (4, 8))
    assert svd.relative_error(chain.reconstruct(), w) < 1e-5


def test_whitened_fits_are_exact_at_full_rank():
    w = RNG.standard_normal((8, 4, 3, 3))
    a = RNG.standard_normal((12, 12))
    assert svd.relative_error(metrics.whitened_separable(w, 12, [a @ a.T]).reconstruct(), w) < 1e-6
    a = RNG.standard_normal((36, 36))
    assert svd.relative_error(metrics.whitened_channel_svd(w, 8, [a @ a.T]).reconstruct(), w) < 1e-6


def test_data_fit_is_near_exact_on_a_subspace_where_weights_are_not(subspace_data):
    path, _ = subspace_data
    _, weights = _fit(path, fit="weights", rank=9)
    _, data = _fit(path, fit="data", rank=9)
    assert weights.output_error_after > 0.3
    assert data.output_error_after < 1e-3
    assert data.fit.startswith("data")


@pytest.mark.parametrize("method,rank", [("tucker2", {"ranks": (3, 32)}), ("cp", {"rank": 24})])
def test_whitened_pointwise_first_chain_keeps_the_input_channels_the_data_uses(
    method, rank, subspace_data
):
    """The 16 input channels mix 3 latent maps: whitened on their second moment, a chain whose
    first 1x1 conv keeps 3 channels (tucker2) reproduces the layer on that data before any
    refit, and cp's factorization at rank 24 gets much closer; fitted to the weights alone, the
    first conv keeps directions the data does not use. (The refit of the last conv hides this
    here: any 3 generic channel mixes of 3-dimensional inputs keep everything.) Checked in
    onnxruntime."""
    path, x = subspace_data
    before = {}
    for whiten in (False, True):
        out, record = _fit(path, method=method, whiten=whiten, force=True, **rank)
        assert ("whitened" in record.fit) == whiten
        before[whiten] = record.output_error_before
    if method == "tucker2":
        assert before[True] < 1e-3 < 0.3 < before[False]
        (ref,), (new,) = run(MODEL, {"x": x}), run(out, {"x": x})
        assert np.linalg.norm(new - ref) / np.linalg.norm(ref) < 1e-3
    else:  # 0.05 against 0.7
        assert before[True] < 0.25 * before[False]


@pytest.mark.parametrize("method", ["separable", "channel-svd", "tucker2"])
def test_unwhitened_data_fit_is_the_weight_fit_refitted(method, subspace_data):
    """The default data fit (no --whiten) factors the weights alone, then refits the last conv:
    its error is at most the bias-corrected weight fit's, and above the whitened fit's."""
    path, _ = subspace_data
    _, weights = _fit(path, method=method, fit="weights", rank=4, force=True)
    _, plain = _fit(path, method=method, whiten=False, rank=4, force=True)
    _, whitened = _fit(path, method=method, rank=4, force=True)
    assert plain.fit.startswith("data: least squares") and "whitened" in whitened.fit
    assert plain.output_error_before == pytest.approx(weights.output_error_before, rel=1e-6)
    assert plain.output_error_after <= weights.output_error_after + 1e-9
    assert whitened.output_error_after < plain.output_error_after


def test_refit_ridge_is_chosen_on_held_out_calibration_data():
    """Fewer calibration rows than unknowns: the held-out fold asks for a strong ridge; with
    plenty of clean rows, the weakest one wins."""
    rng = np.random.default_rng(5)

    def folds(rows, noise):
        truth = rng.standard_normal((40, 3))
        parts = []
        for _ in range(2):
            z = rng.standard_normal((rows, 40))
            y = z @ truth + noise * rng.standard_normal((rows, 3))
            parts.append((z.T @ z, z.T @ y, float((y**2).sum())))
        return [parts]

    few, _ = metrics.cross_validated_ridge(folds(12, 1.0))
    many, _ = metrics.cross_validated_ridge(folds(2000, 0.0))
    assert few > many == metrics.RIDGES[0]


@pytest.mark.parametrize("method", ["separable", "channel-svd", "tucker2", "cp"])
def test_refit_never_increases_the_output_error(method, subspace_data):
    path, _ = subspace_data
    for rank in (2, 4):
        _, record = _fit(path, method=method, rank=rank, force=True)
        assert record.output_error_after <= record.output_error_before + 1e-9


def test_reported_error_is_the_models_error_on_the_calibration_data(subspace_data):
    path, x = subspace_data
    out, record = _fit(path, method="tucker2", rank=3)
    (ref,), (new,) = run(MODEL, {"x": x}), run(out, {"x": x})
    measured = np.linalg.norm(new - ref) / np.linalg.norm(ref)
    assert abs(measured - record.output_error_after) < 1e-3  # 8x8 maps: every position sampled


def test_bias_correction_matches_channel_means(subspace_data):
    path, x = subspace_data
    out, record = _fit(path, method="channel-svd", fit="weights", rank=2, force=True)
    assert record.fit == "weights + bias correction"
    (ref,), (new,) = run(MODEL, {"x": x}), run(out, {"x": x})
    np.testing.assert_allclose(new.mean(axis=(0, 2, 3)), ref.mean(axis=(0, 2, 3)), atol=1e-3)


def test_sequential_mode_corrects_upstream_error(tmp_path):
    from onnx import helper, numpy_helper

    model = conv_model(W, ["N", 16, 8, 8], {"pads": [1, 1, 1, 1]})
    w2 = RNG.standard_normal((16, 32, 3, 3)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w2, "W2"))
    model.graph.node.append(
        helper.make_node("Conv", ["y", "W2"], ["z"], name="conv2", pads=[1, 1, 1, 1])
    )
    model.graph.output[0].name = "z"
    x = RNG.standard_normal((64, 16, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    errors = {}
    for sequential in (True, False):
        cal = Calibration(str(tmp_path / "c.npz"), sequential=sequential)
        out, _ = ol.optimize(model, method="channel-svd", rank=8, check=0, calibration=cal)
        (ref,), (new,) = run(model, {"x": x}), run(out, {"x": x})
        errors[sequential] = np.linalg.norm(new - ref) / np.linalg.norm(ref)
    assert errors[True] < errors[False]


def test_image_folder_calibration(tmp_path):
    from PIL import Image

    for i in range(5):
        Image.fromarray(RNG.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    model = conv_model(RNG.standard_normal((8, 3, 3, 3)).astype(np.float32), ["N", 3, 8, 8])
    from onnx_lowrank.calibrate import load_samples

    samples = load_samples(str(tmp_path), model, Preprocess(mean=(0.5,), std=(0.25,)))
    assert samples.arrays["x"].shape == (5, 3, 8, 8) and samples.labels is None
    assert -2.01 <= samples.arrays["x"].min() and samples.arrays["x"].max() <= 2.01
    _, report = ol.optimize(
        model,
        method="channel-svd",
        rank=2,
        check=0,
        force=True,
        calibration=Calibration(str(tmp_path)),
    )
    assert report.records[0].output_error_after is not None


def test_data_images_are_read_with_the_preprocess_settings(tmp_path):
    """--data as an image folder: the output check reads it with --size/--mean/--std/... (the
    config's `preprocess`), as the calibration images are."""
    from PIL import Image

    from onnx_lowrank.calibrate import load_samples
    from onnx_lowrank.validate import compare

    for i in range(4):
        Image.fromarray(RNG.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
    model = conv_model(RNG.standard_normal((8, 3, 3, 3)).astype(np.float32), ["N", 3, 8, 8])
    settings = Preprocess(mean=(0.5,), std=(0.25,))
    config = ol.OptimizeConfig.from_options(
        method="channel-svd", rank=2, force=True, data=str(tmp_path), preprocess=settings
    )
    assert ol.OptimizeConfig.from_dict(config.to_dict()) == config
    out, report = ol.optimize(model, config)
    errors = {
        pre: compare(model, out, [load_samples(str(tmp_path), model, pre).arrays])
        for pre in (settings, Preprocess())
    }
    assert report.validation["max_abs_error"] == pytest.approx(
        errors[settings]["max_abs_error"], rel=1e-6
    )
    assert errors[settings]["max_abs_error"] != pytest.approx(
        errors[Preprocess()]["max_abs_error"], rel=1e-3
    )


@pytest.mark.parametrize("case", ["name", "shape", "empty", "missing", "kind"])
def test_calibration_loading_errors_are_one_sentence(case, tmp_path):
    if case == "name":
        np.savez(tmp_path / "c.npz", images=np.zeros((4, 16, 8, 8), np.float32))
        path, match = tmp_path / "c.npz", "no array for model input"
    elif case == "shape":
        np.savez(tmp_path / "c.npz", x=np.zeros((4, 3, 8, 8), np.float32))
        path, match = tmp_path / "c.npz", "expects"
    elif case == "empty":
        (tmp_path / "images").mkdir()
        path, match = tmp_path / "images", "no image files"
    elif case == "missing":
        path, match = tmp_path / "nope.npz", "no such file"
    else:
        (tmp_path / "c.txt").write_text("1 2 3")
        path, match = tmp_path / "c.txt", "expected an .npz"
    with pytest.raises(ol.LowRankError, match=match) as info:
        ol.optimize(MODEL, method="separable", rank=2, calibration=Calibration(str(path)))
    assert "\n" not in str(info.value)


def _fc_model(op: str, k: int = 32, m: int = 24):
    from onnx import TensorProto, helper, numpy_helper

    w = RNG.standard_normal((k, m)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "F")]
    inputs = ["a", "F"]
    attrs = {}
    if op == "Gemm":
        inits.append(numpy_helper.from_array(RNG.standard_normal(m).astype(np.float32), "C"))
        inputs.append("C")
        attrs = {"alpha": 0.5, "beta": 2.0}
    node = helper.make_node(op, inputs, ["y"], name="fc", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", m])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_fc_data_fit_on_a_subspace(op, tmp_path):
    model = _fc_model(op)
    a = (RNG.standard_normal((300, 4)) @ RNG.standard_normal((4, 32))).astype(np.float32)
    np.savez(tmp_path / "c.npz", a=a)
    errors = {}
    for fit in ("weights", "data"):
        out, report = ol.optimize(
            model,
            method="fc-svd",
            rank=4,
            check=0,
            rank_multiple=1,
            calibration=Calibration(str(tmp_path / "c.npz"), fit=fit, whiten=True),
        )
        record = report.records[0]
        assert record.output_error_after <= record.output_error_before + 1e-9
        (ref,), (new,) = run(model, {"a": a}), run(out, {"a": a})
        errors[fit] = np.linalg.norm(new - ref) / np.linalg.norm(ref)
        assert abs(errors[fit] - record.output_error_after) < 1e-3 + 0.01 * errors[fit]
    assert errors["data"] < 1e-3 < errors["weights"]


def test_calibration_passes_run_only_the_graph_above_the_tensor():
    """datafit.upstream: the nodes the tensor depends on and no others; same values; inputs kept
    (one of them unused above the tensor)."""
    from onnx import TensorProto, helper, numpy_helper

    from onnx_lowrank.datafit import upstream

    w = RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["a"], name="c1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["a"], ["b"], name="r1"),
            helper.make_node("Add", ["b", "bias2"], ["c"], name="add"),
            helper.make_node("Sigmoid", ["x2"], ["d"], name="side"),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5]),
            helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", 3]),
        ],
        [
            helper.make_tensor_value_info("c", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("d", TensorProto.FLOAT, None),
        ],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(1, np.float32), "bias2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    cut = upstream(model, ["b"])
    assert [n.name for n in cut.graph.node] == ["c1", "r1"]
    assert [i.name for i in cut.graph.initializer] == ["w"]
    assert [o.name for o in cut.graph.output] == ["b"]
    feeds = {
        "x": RNG.standard_normal((2, 2, 5, 5)).astype(np.float32),
        "x2": RNG.standard_normal((2, 3)).astype(np.float32),
    }
    (b,) = run(cut, feeds)
    full = onnx.ModelProto()
    full.CopyFrom(model)
    full.graph.output.extend([onnx.ValueInfoProto(name="b")])
    np.testing.assert_array_equal(b, run(full, feeds)[2])


def test_kept_conv_below_a_factored_one_absorbs_its_error(tmp_path):
    """conv2 (1x1, 16 -> 4: nothing to gain at rank 8) is kept; with refit_kept it is refitted
    on conv1's compressed output, and the model's output error drops."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(5)
    model = conv_model(W, ["N", 16, 8, 8], {"pads": [1, 1, 1, 1]})
    w2 = rng.standard_normal((4, 32, 1, 1)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w2, "W2"))
    model.graph.node.extend(
        [
            helper.make_node("Relu", ["y"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "W2"], ["z"], name="conv2"),
        ]
    )
    model.graph.output[0].name = "z"
    x = rng.standard_normal((256, 16, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    errors, records = {}, {}
    for refit in (True, False):
        cal = Calibration(str(tmp_path / "c.npz"), refit_kept=refit)
        out, report = ol.optimize(model, method="channel-svd", rank=8, check=0, calibration=cal)
        (ref,), (new,) = run(model, {"x": x}), run(out, {"x": x})
        errors[refit] = np.linalg.norm(new - ref) / np.linalg.norm(ref)
        records[refit] = {r.node: r for r in report.records}
    assert records[True]["conv2"].status == "skipped"
    assert "kept, refitted" in records[True]["conv2"].fit
    kept = records[True]["conv2"]
    assert kept.output_error_after < kept.output_error_before
    assert records[False]["conv2"].fit is None
    assert errors[True] < errors[False]


def test_ridge_shrinks_towards_the_prior():
    """With a prior, a strong ridge gives the prior back (not zero); with few noisy rows and
    the truth as prior, cross-validation picks a strong ridge and beats the zero-shrunk fit."""
    rng = np.random.default_rng(9)
    truth = rng.standard_normal((40, 3))
    z = rng.standard_normal((30, 40))
    gram, cross = z.T @ z, z.T @ (z @ truth)
    np.testing.assert_allclose(metrics.least_squares(gram, cross, 1e6, truth), truth, atol=1e-3)
    assert np.abs(metrics.least_squares(gram, cross, 1e6)).max() < 1e-3

    parts = []
    for _ in range(2):
        z = rng.standard_normal((12, 40))
        y = z @ truth + 3.0 * rng.standard_normal((12, 3))
        parts.append((z.T @ z, z.T @ y, float((y**2).sum())))
    ridge, held = metrics.cross_validated_ridge([parts], [truth])
    _, held_zero = metrics.cross_validated_ridge([parts])
    assert ridge >= 10 and held < held_zero


def test_the_output_check_runs_on_the_real_inputs_when_there_are_some(subspace_data, tmp_path):
    """A data-fitted model is meant to agree on inputs like the calibration data, not on noise:
    the check runs on the first 64 calibration samples, or on --data (with accuracy when it
    has labels), and says which."""
    from onnx_lowrank.report import validation_line
    from onnx_lowrank.validate import compare

    path, x = subspace_data
    out, report = ol.optimize(
        MODEL, method="channel-svd", rank=4, force=True, calibration=ol.Calibration(path)
    )
    v = report.validation
    assert v["inputs"] == "calibration" and v["samples"] == 64
    expected = compare(MODEL, out, [{"x": x[:32]}, {"x": x[32:64]}])
    assert v["max_rel_error"] == pytest.approx(expected["max_rel_error"], rel=1e-6)
    assert validation_line(v).startswith("check on 64 calibration input(s): ")
    labels = np.arange(len(x)) % 3
    np.savez(tmp_path / "eval.npz", x=x[:10], y=labels[:10])
    out, report = ol.optimize(MODEL, method="channel-svd", rank=4, data=str(tmp_path / "eval.npz"))
    v = report.validation
    assert v["inputs"] == "--data" and v["samples"] == 10
    assert {"accuracy_reference", "accuracy_candidate"} <= set(v)
    assert "accuracy" in validation_line(v)
    _, report = ol.optimize(MODEL, method="channel-svd", rank=4)
    assert report.validation["inputs"] == "random" and report.validation["samples"] == 2


def test_the_output_check_feeds_a_fixed_batch_model_one_batch_at_a_time(tmp_path):
    model = conv_model(W, [1, 16, 8, 8], {"pads": [1, 1, 1, 1]})
    x = RNG.standard_normal((5, 16, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    _, report = ol.optimize(model, method="channel-svd", rank=4, data=str(tmp_path / "eval.npz"))
    assert report.validation["inputs"] == "--data" and report.validation["samples"] == 5
    from onnx_lowrank.auto import _Quality
    from onnx_lowrank.calibrate import load_samples
    from onnx_lowrank.config import OptimizeConfig

    config = OptimizeConfig.from_options(data=str(tmp_path / "eval.npz"))
    samples = load_samples(config.data, model)
    assert _Quality(model, config, samples)(model)["output_error"] == 0.0  # the planner's check


def test_a_bad_check_input_path_ends_the_run_before_any_work(tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the model was factored before --data was read")

    monkeypatch.setattr("onnx_lowrank.api.build", no_work)
    with pytest.raises(ol.LowRankError, match="no such file"):
        ol.optimize(MODEL, method="channel-svd", rank=4, data=str(tmp_path / "missing.npz"))
