"""The planner: greedy allocation against brute force, the latency cache, plan files, and a
target that cannot be met."""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from modelgen import conv_model, run

from onnx_lowrank.auto import layer_options
from onnx_lowrank.calibrate import Samples
from onnx_lowrank.config import Calibration, OptimizeConfig
from onnx_lowrank.datafit import DataContext, input_patches, patch_output_error
from onnx_lowrank.latency import LatencyTable, MatMulShape
from onnx_lowrank.passes.base import read_conv
from onnx_lowrank.plan import LayerPlan, Option, Plan, allocate, apply_step


def _convex_layer(rng, name: str, n: int) -> LayerPlan:
    """Options whose error grows convexly as latency shrinks (diminishing returns)."""
    ms = 1.0 + 9.0 * rng.random()
    savings = np.sort(rng.random(n)) * ms * 0.9
    slopes = np.sort(rng.random(n) + 0.01)  # increasing error per ms saved: convex
    errors2 = np.cumsum(np.diff(np.concatenate([[0.0], savings])) * slopes)
    options = [Option(None, None, 0, 0.0, ms)]
    options += [
        Option("m", [i + 1], 0, float(np.sqrt(e)), ms - s)
        for i, (s, e) in enumerate(zip(savings, errors2))
    ]
    return LayerPlan(name, "Conv", options)


def _brute_force(layers, budget):
    best = None
    for combo in itertools.product(*(range(len(x.options)) for x in layers)):
        ms = sum(x.options[c].ms for x, c in zip(layers, combo))
        if ms <= budget + 1e-9:
            err = sum(x.options[c].error ** 2 for x, c in zip(layers, combo))
            best = err if best is None else min(best, err)
    return best


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 3))
def test_greedy_path_points_are_optimal_on_convex_tables(seed, n_layers, n_options):
    rng = np.random.default_rng(seed)
    layers = [_convex_layer(rng, f"l{i}", n_options) for i in range(n_layers)]
    base = sum(x.options[0].ms for x in layers)
    for step in allocate(layers, base):
        assert abs(step.error2 - _brute_force(layers, step.ms)) < 1e-9


def test_allocation_stops_at_the_budget():
    rng = np.random.default_rng(0)
    layers = [_convex_layer(rng, f"l{i}", 4) for i in range(3)]
    base = sum(x.options[0].ms for x in layers)
    path = allocate(layers, base, budget_ms=base / 2)
    assert path[-1].ms <= base / 2 or len(path) == 1 + 3 * 4
    assert all(a.ms > b.ms and a.error2 <= b.error2 + 1e-12 for a, b in zip(path, path[1:]))


def test_plan_file_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    layers = [_convex_layer(rng, f"l{i}", 3) for i in range(2)]
    plan = Plan(layers, 12.5, target={"kind": "speedup", "value": 2.0}, measured_ms=6.0)
    apply_step(layers, allocate(layers, 12.5)[2])
    layers[0].profiled_ms, plan.profiled_other_ms = [1.5, 0.25], [0.5, 0.5]
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.choices() == plan.choices() and loaded.predicted_ms == plan.predicted_ms
    assert loaded.layers[0].profiled_ms == [1.5, 0.25] and loaded.profiled_other_ms == [0.5, 0.5]
    assert json.loads((tmp_path / "plan.json").read_text())["predicted_speedup"] > 1


def test_latency_cache_is_reused_and_keyed_by_provider_and_version(tmp_path, monkeypatch):
    ops, shape = [MatMulShape(16, 8)], (4, 16)
    table = LatencyTable("cpu", cache_dir=str(tmp_path), runs=3)
    first = table.measure(ops, shape)
    table.save()
    again = LatencyTable("cpu", cache_dir=str(tmp_path), runs=3)
    assert again.measure(ops, shape) == first and again.hits == 1 and again.misses == 0
    monkeypatch.setattr("onnx_lowrank.latency.ort.__version__", "0.0.0-other")
    other = LatencyTable("cpu", cache_dir=str(tmp_path), runs=3)
    assert other.path != again.path and other.entries == {}
    cuda = LatencyTable("cuda", cache_dir=str(tmp_path), runs=3)
    assert cuda.path != again.path


def test_latency_cache_tells_avx2_from_avx512_under_one_model_name(tmp_path, monkeypatch):
    """Virtual machines may report the same CPU model name with different vector extensions;
    onnxruntime's convs run differently on them, so they must not share a latency table."""
    paths = []
    for flags in ("fpu sse2 avx avx2 fma", "fpu sse2 avx avx2 fma avx512f avx512bw"):
        info = tmp_path / f"cpuinfo-{len(paths)}"
        info.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n")
        monkeypatch.setattr("onnx_lowrank.latency.CPUINFO", str(info))
        table = LatencyTable("cpu", cache_dir=str(tmp_path), runs=3)
        assert table.machine.startswith("AMD EPYC|")
        paths.append(table.path)
    assert paths[0] != paths[1]


def test_weight_streaming_curve_is_measured_once_per_machine(tmp_path, monkeypatch):
    """The cost of weights that do not stay in the cache, by their total: more weights, same
    arithmetic, timed side by side at each size; cached with the chain timings, keyed by
    threads, and never decreasing with size."""
    from onnx_lowrank.latency import STREAM_MB

    table = LatencyTable("cpu", threads=1, cache_dir=str(tmp_path), runs=3)
    curve = table.stream_curve(runs=30)
    sizes, costs = zip(*curve.points)
    assert len(sizes) == len(STREAM_MB) and list(sizes) == sorted(sizes)
    assert all(c >= 0 for c in costs) and list(costs) == sorted(costs)
    table.save()

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again")

    monkeypatch.setattr("onnx_lowrank.latency.bench", no_timing)
    assert LatencyTable("cpu", threads=1, cache_dir=str(tmp_path)).stream_curve() == curve
    calls = []
    slower = iter([1.0, 3.0, 1.0, 2.0] + [1.0, 4.0] * (len(STREAM_MB) - 2))
    monkeypatch.setattr(
        "onnx_lowrank.latency.bench",
        lambda models, *a, **k: calls.append(models) or {"median_ms": [next(slower), next(slower)]},
    )
    two = LatencyTable("cpu", threads=2, cache_dir=str(tmp_path)).stream_curve()
    assert len(calls) == len(STREAM_MB)  # one shared weight against one per MatMul, per size
    assert all([len(m.graph.initializer) for m in models] == [1, 16] for models in calls)
    n = calls[0][1].graph.initializer[0].dims[0]
    assert two.points[0][0] == 4 * 16 * n * n and abs(n * n * 64 - 0.25e6) < 64 * (2 * n + 1)
    # 2 ms, then 1 (noise, kept at 2: the curve never falls), then 3 ms
    assert [c for _, c in two.points[:3]] == [2.0, 2.0, 3.0]


def test_the_streaming_curve_is_linear_between_its_points_and_beyond_the_last():
    from onnx_lowrank.latency import StreamCurve

    curve = StreamCurve(((1e6, 0.0), (2e6, 0.05), (4e6, 0.15)))
    assert curve.ms(0) == 0.0 and curve.ms(5e5) == 0.0 and curve.ms(1e6) == 0.0
    assert abs(curve.ms(1.5e6) - 0.025) < 1e-12 and abs(curve.ms(3e6) - 0.1) < 1e-12
    assert abs(curve.ms(6e6) - 0.25) < 1e-12  # the last slope, 0.05 ms per MB, beyond
    assert curve.describe() == "0 ms at 1 MB, 0.05 at 2, 0.15 at 4"


def _data_context(model, x, whiten=True):
    calibration = Calibration("cal.npz", size=len(x), fit="data", whiten=whiten)
    return DataContext(model, Samples({"x": x}), calibration)


def _one_channel_case(tmp_path, monkeypatch):
    """A 16x8x3x3 conv whose calibration inputs are constant over space on channel 0 only, a
    2x speedup config and a throwaway latency table (caches under tmp_path)."""
    monkeypatch.setattr("onnx_lowrank.auto.CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    model = conv_model(weight, [1, 8, 12, 12])
    x = np.zeros((8, 8, 12, 12), np.float32)
    x[:, 0] = rng.standard_normal((8, 1, 1))
    config = OptimizeConfig.from_options(method="auto", speedup=2.0)
    return model, x, config, LatencyTable("cpu", cache_dir=str(tmp_path), runs=2)


def test_patch_output_error_is_the_output_error_onnxruntime_measures():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((12, 4, 3, 3)).astype(np.float32)
    model = conv_model(weight, ["N", 4, 10, 10], {"pads": [1, 0, 1, 0]})
    x = rng.standard_normal((16, 4, 10, 10)).astype(np.float32)
    layer = read_conv(gs.import_onnx(model).nodes[0])
    patches = input_patches(_data_context(model, x), [layer])["conv"]
    assert patches.shape == (16 * 10 * 8, 4, 3, 3)  # every position of every image
    approx = weight + 0.1 * rng.standard_normal(weight.shape).astype(np.float32)
    (y,) = run(model, {"x": x})
    (y2,) = run(conv_model(approx, ["N", 4, 10, 10], {"pads": [1, 0, 1, 0]}), {"x": x})
    expected = np.linalg.norm(y - y2) / np.linalg.norm(y)
    assert np.isclose(patch_output_error(weight, approx, patches, 1), expected, rtol=1e-4)
    assert patch_output_error(weight, weight, patches, 1) == 0.0


def test_planner_errors_follow_the_calibration_data(tmp_path, monkeypatch):
    """Inputs that are constant over space on one channel: every rank of a whitened fit
    reproduces the outputs, so its data errors are ~0 where the weight errors are large."""
    model, x, config, table = _one_channel_case(tmp_path, monkeypatch)
    by_weights = layer_options(model, config, table, workers=1)[0].options[1:]
    by_data = layer_options(model, config, table, workers=1, data=_data_context(model, x))
    by_data = by_data[0].options[1:]
    assert [(o.method, o.rank) for o in by_data] == [(o.method, o.rank) for o in by_weights]
    # the whitened fits (what the build runs with calibration) keep what the data uses
    whitened = [i for i, o in enumerate(by_data) if o.method in ("separable", "channel-svd")]
    assert len(whitened) >= 4
    assert max(by_data[i].error for i in whitened) < 1e-3 < min(o.error for o in by_weights)


def test_planner_whitens_the_chains_that_open_with_a_1x1_conv(tmp_path, monkeypatch):
    """tucker2 and cp under --whiten: the planner's data errors are those of the whitened fits
    (far below the plain fits' on inputs that use one channel), as the build computes them."""
    import onnx_lowrank as ol

    model, x, config, table = _one_channel_case(tmp_path, monkeypatch)
    plans = {}
    for whiten in (False, True):
        data = _data_context(model, x, whiten)
        options = layer_options(model, config, table, workers=1, data=data)[0].options[1:]
        plans[whiten] = {(o.method, tuple(o.rank)): o.error for o in options}
    pointwise = [k for k in plans[True] if k[0] in ("tucker2", "cp")]
    assert len(pointwise) >= 6
    assert all(plans[True][k] < plans[False][k] for k in pointwise)
    np.savez(tmp_path / "cal.npz", x=x)
    _, report = ol.optimize(
        model,
        method="tucker2",
        ranks=(5, 8),
        check=0,
        rank_multiple=1,
        calibration=Calibration(str(tmp_path / "cal.npz"), whiten=True),
    )
    assert report.records[0].output_error_before == pytest.approx(
        plans[True][("tucker2", (5, 8))], abs=0.02
    )


def test_unnamed_layers_are_planned_apart(tmp_path, monkeypatch):
    """Exporters leave nodes unnamed: each layer still gets its own plan entry and chain."""
    from onnx import TensorProto, helper, numpy_helper

    import onnx_lowrank as ol

    monkeypatch.setattr("onnx_lowrank.auto.CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("onnx_lowrank.auto.AUTO_METHODS", ("separable",))
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["y"], ["z"]),
        helper.make_node("Conv", ["z", "W2"], ["o"], pads=[1, 1, 1, 1]),
    ]
    weights = [rng.standard_normal((16, c, 3, 3)).astype(np.float32) for c in (8, 16)]
    graph = helper.make_graph(
        nodes,
        "unnamed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, f"W{i + 1}") for i, w in enumerate(weights)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    plan = tmp_path / "plan.json"
    Plan(
        [
            LayerPlan(
                "y", "Conv", [Option(None, None, 0, 0, 0), Option("separable", [6], 0, 0, 0)], 1
            ),
            LayerPlan(
                "o", "Conv", [Option(None, None, 0, 0, 0), Option("separable", [9], 0, 0, 0)], 1
            ),
        ],
        1.0,
    ).save(plan)
    out, report = ol.optimize(model, plan_path=str(plan), check=0)
    assert {(r.node, r.rank) for r in report.records} == {("y", 6), ("o", 9)}
    chains = [n.name for n in out.graph.node if n.op_type == "Conv"]
    assert len(set(chains)) == 4 and all(n.startswith(("y/", "o/")) for n in chains)
    assert [n.name for n in out.graph.node if n.op_type == "Relu"] == [""]  # untouched


def test_fast_models_are_timed_more_often():
    from onnx_lowrank.auto import MAX_RUNS, MIN_RUNS, runs_for

    assert runs_for(0.2) == MAX_RUNS and runs_for(500.0) == MIN_RUNS
    assert MIN_RUNS < runs_for(10.0) < MAX_RUNS


def _two_layers():
    options = [Option(None, None, 0, 0.0, 4.0), Option("m", [8], 0, 0.1, 1.0)]
    options.append(Option("n", [4], 0, 0.2, 0.5))  # another method
    return [LayerPlan("a", "Conv", list(options)), LayerPlan("b", "Conv", list(options))]


def test_in_place_timings_correct_the_prediction():
    """After a plan is built, each factored layer's options are scaled by (in place / table)
    of the option that ran (for that method only), and a step is predicted from the measured
    one (the original included) that leaves the least to predict, plus the differences of the
    layers whose choice differs."""
    from onnx_lowrank.auto import InPlace
    from onnx_lowrank.plan import Step

    layers = _two_layers()
    original = ({"a": 4.0, "b": 4.0}, 2.0)  # profiled: 10 ms in all, as the baseline
    built = ({"a": 1.5, "b": 3.0}, 1.0)  # a ran 1.5x slower than the table said; b kept
    in_place = InPlace(layers, original, 10.0, lambda model: built)
    step = Step(7.0, 0.01, [1, 0])
    assert not in_place.learned
    in_place.learn(step, None, 5.5)  # measured as its profile adds up: scale 1
    assert in_place.learned and in_place.factor == {("a", "m"): 1.5}
    assert in_place.predict(step) == 5.5 and in_place.changed == 0  # its own measurement
    # from the 5.5 ms measured (it leaves 1.0 + 3.5 ms to predict, the original 3.5 + 3.5):
    # a 1.0 (x 1.5) -> 0.5 ms of another method (not learned: x 1), b 4.0 -> 0.5
    assert in_place.predict(Step(4.0, 0, [2, 2])) == 5.5 + (0.5 - 1.0 * 1.5) + (0.5 - 4.0)
    assert in_place.changed == 2
    assert in_place.predict(Step(9.5, 0, [0, 0])) == 10.0  # nearest: the original
    # the same profile from a model that measured 4.4 ms: every part of it weighs 0.8
    fresh = InPlace(_two_layers(), original, 10.0, lambda model: built)
    fresh.learn(step, None, 4.4)
    assert abs(fresh.factor["a", "m"] - 1.2) < 1e-12 and fresh.predict(step) == 4.4


def test_the_prediction_adds_the_change_in_the_cost_of_streaming_the_weights():
    """A step whose model holds more weight bytes than its anchor's is predicted slower by the
    machine's streaming curve at its total minus at the anchor's (the other layers' weights are
    evicted too), one holding less faster; below the curve's knee a change costs nothing."""
    from onnx_lowrank.auto import InPlace
    from onnx_lowrank.latency import StreamCurve
    from onnx_lowrank.plan import Step

    layers = _two_layers()
    for layer in layers:
        for option, weight_bytes in zip(layer.options, (4000, 1000, 500)):
            option.weight_bytes = weight_bytes
    original = ({"a": 4.0, "b": 4.0}, 2.0)
    curve = StreamCurve(((3000, 0.0), (9000, 6.0)))  # 1 ms per 1000 bytes past 3000
    plain = InPlace(layers, original, 10.0, lambda model: original)
    streamed = InPlace(
        layers, original, 10.0, lambda model: original, stream=curve, model_bytes=9000
    )
    # the original holds 9000 bytes (6 ms of streaming); [1, 0]: 6000 (3 ms); [2, 2]: 2000 (0)
    assert streamed.footprint(Step(0, 0, [0, 0])) == 9000
    assert streamed.predict(Step(7.0, 0, [1, 0])) == plain.predict(Step(7.0, 0, [1, 0])) - 3.0
    assert streamed.predict(Step(4.0, 0, [2, 2])) == plain.predict(Step(4.0, 0, [2, 2])) - 6.0
    assert streamed.predict(Step(10.0, 0, [0, 0])) == 10.0  # the original itself
    streamed.built.append((Step(4.0, 0, [2, 2]), 3.0))  # measured: below the knee
    # from it to 2500 bytes: still below the knee, only b's table difference (0.5 -> 1.0 ms)
    assert streamed.predict(Step(4.0, 0, [2, 1])) == 3.0 + 0.5


def test_a_trial_build_corrects_the_first_plan_too():
    """Before the first plan is built, a trial build of a step further along the path (every
    layer factored at least as far) teaches the factors, so the first plan has a corrected
    prediction as well; the trial is built once, and from an earlier step when the first
    plan is the path's last."""
    from onnx_lowrank.auto import WARM_UP_BEYOND, InPlace
    from onnx_lowrank.plan import Step

    path = [Step(10.0, 0, [0, 0]), Step(7.5, 0, [1, 0]), Step(6.0, 0, [1, 1])]
    path += [Step(5.0, 0, [2, 1]), Step(4.0, 0, [2, 2])]
    trials = []

    def trial(step):
        trials.append(step)
        return None, 5.0  # a and b each ran twice as slow as the table said

    original = ({"a": 4.0, "b": 4.0}, 2.0)
    profile = lambda model: ({"a": 2.0, "b": 2.0}, 1.0)  # noqa: E731
    in_place = InPlace(_two_layers(), original, 10.0, profile, trial)
    in_place.warm_up(path, 1)  # the first plan: step 1 (7.5 ms); the trial: <= 6 ms
    assert trials == [path[2]] and path[2].ms <= path[1].ms / WARM_UP_BEYOND
    assert in_place.learned and in_place.factor == {("a", "m"): 2.0, ("b", "m"): 2.0}
    assert in_place.predict(path[2]) == 5.0  # the trial's own measurement
    # from the trial, a moves to another method's 0.5 ms option (not learned: x 1)
    assert in_place.predict(path[3]) == 5.0 + (0.5 - 1.0 * 2.0) and in_place.changed == 1
    in_place.warm_up(path, 3)
    assert len(trials) == 1
    last = InPlace(_two_layers(), original, 10.0, profile, trial)
    last.warm_up(path, len(path) - 1)  # nothing past the last step: the one before it
    assert trials[1] == path[3] and last.learned


def test_planner_times_on_calibration_inputs_when_it_has_them():
    from onnx_lowrank.auto import timing_feeds

    x = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    data = DataContext(None, Samples({"x": x}), Calibration("unused.npz"))
    feeds = timing_feeds(data, OptimizeConfig(batch=2))
    assert [f["x"].tolist() for f in feeds] == [x[0:2].tolist(), x[2:4].tolist()]
    assert timing_feeds(data, OptimizeConfig(batch=8)) is None  # too few samples: random
    assert timing_feeds(None, OptimizeConfig()) is None


def test_a_quality_target_searches_past_the_move_that_broke_it():
    """--max-drop: the greedy path cuts layer a first (least weight error per ms), but in
    accuracy a breaks the limit at its second cut while b has room; after bisecting the path
    the search goes on from the last plan within the limit with a's breaking cut and anything
    faster banned, and returns the fastest measured plan within the limit. Every plan it
    returns was measured within the limit (brute force over the table agrees here)."""
    from onnx_lowrank.auto import REFINE_ROUNDS, plan_for_target

    def layer(name, errors):  # 10 ms, then 6, 4, 2, 1 ms
        options = [Option(None, None, 0, 0.0, 10.0)]
        options += [
            Option("m", [r], 0, e, ms) for r, e, ms in zip((8, 4, 2, 1), errors, (6, 4, 2, 1))
        ]
        return LayerPlan(name, "Conv", options)

    layers = [layer("a", (0.01, 0.02, 0.03, 0.04)), layer("b", (0.2, 0.3, 0.4, 0.5))]
    drop_a = {0: 0.0, 1: 0.2, 2: 2.0, 3: 5.0, 4: 9.0}  # a's cut to 4 ms already costs 2 points
    drop_b = {0: 0.0, 1: 0.1, 2: 0.2, 3: 0.4, 4: 3.0}
    built = []

    def build(plan):
        built.append([x.choice for x in plan.layers])
        return (tuple(built[-1]), [])

    def evaluate(model):
        a, b = model
        ms = layers[0].options[a].ms + layers[1].options[b].ms
        return {"speedup": 20.0 / ms, "drop": drop_a[a] + drop_b[b]}

    config = OptimizeConfig(method="auto", max_drop=1.0, data="labelled.npz")
    plan, (model, _) = plan_for_target(layers, 20.0, config, build, evaluate)
    assert model == (1, 3)  # a cut once (0.2), b three times (0.4): 8 ms, 2.5x
    assert [x.choice for x in plan.layers] == [1, 3] and plan.measured_ms == 8.0
    fits = [
        (layers[0].options[a].ms + layers[1].options[b].ms, (a, b))
        for a, b in itertools.product(range(5), range(5))
        if drop_a[a] + drop_b[b] <= 1.0
    ]
    assert min(fits)[1] == (1, 3)
    assert any("more greedy path" in n for n in plan.notes) and REFINE_ROUNDS >= 1
    assert len(built) <= 12  # a few bisections, not a brute force (25 plans)
