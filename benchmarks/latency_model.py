"""The planner's in-place latency correction, evaluated offline on fixed charnet plans.

The planner predicts a plan before building it from the plans built so far (`auto.InPlace`): the
measured time of the anchor that leaves the least to predict, plus each changed layer's table-time
difference scaled by the (in-place / table) factor learned for that layer and method, plus the
change in the machine's measured cost of streaming the model's weights between the anchor's total
weight bytes and the plan's (`LatencyTable.stream_curve`). Inside a search the anchors and the
targets come in one order; here every plan of a fixed grid (charnet conv2 separable 16-120 x conv3
separable 32 / 80 / channel-svd 48) is built and timed once, in one loop with the original (three
loops, medians), and profiled, and the prediction is replayed for every target from every one or
two other plans as anchors. The in-place / table factor of each layer in each plan is printed too.
Variants of the correction are compared on the same measurements:

- `factors only`: without the streaming term (each factor from the latest plan that ran the
  layer / method), as the planner predicted before the term was added; the variants below
  change this one;
- `planner`: what `InPlace` does: the factors plus the streaming curve's change;
- `one cost per byte`: the factors plus (weight bytes added) x one measured cost per byte
  (the curve's 8 MB point per byte: what the planner used before the curve);
- `footprint`: each factor from the anchor whose total weight bytes are nearest the target's
  (in-place factors grow with the model's weight footprint: cache);
- `rank`: each factor from the anchor whose option of that layer (same method) is nearest in
  table time to the target's (a factor learned at one rank applied at another);
- `footprint slope`: where the two anchors ran a layer at different weight footprints, its
  log factor is taken as linear in the footprint (slope from the two) and extrapolated to the
  target's, from the nearer anchor (anchors at least 0.2 MB apart, the change clipped to
  0.5-2x);
- `footprint term`: the factors-only prediction plus gamma x (target's weight bytes - its
  anchor's), gamma being what predicting the heavier anchor from the lighter one
  missed, per byte (anchors >= 0.3 MB apart, 0 to 0.1 ms per MB); and the
  same with one gamma fitted on every pair (in-sample: a bound, not a predictor);
- `average`: the predictions from each anchor averaged, weighted by 1 / what each leaves to
  predict, instead of the single least-to-predict anchor.

    OPENBLAS_NUM_THREADS=1 python benchmarks/latency_model.py      # about 2 minutes
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import numpy as np
import onnx

from onnx_lowrank import auto
from onnx_lowrank.api import _pinned_copy, build
from onnx_lowrank.bench import bench
from onnx_lowrank.config import OptimizeConfig
from onnx_lowrank.graph import weight_bytes
from onnx_lowrank.latency import STREAM_COUNT, LatencyTable, StreamCurve
from onnx_lowrank.plan import Step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy import RESULTS, model_path  # noqa: E402

CONV2 = [("separable", (r,)) for r in (16, 32, 48, 80, 96, 120)]
CONV3 = [("separable", (32,)), ("separable", (80,)), ("channel-svd", (48,))]
LOOPS, RUNS = 3, 600
FOOTPRINT_APART = 3e5  # bytes between two anchors before their difference is trusted
MAX_GAMMA = 1e-7  # ms per byte (0.1 ms per MB) at most


def summary(errors: list[float]) -> dict:
    e = np.array(errors)
    return {
        "n": len(e),
        "within_15": float(np.mean(e <= 0.15)),
        "median": float(np.median(e)),
        "p90": float(np.quantile(e, 0.9)),
        "max": float(e.max()),
    }


def main() -> int:
    model = onnx.load(model_path("charnet"))
    config = OptimizeConfig.from_options(method="auto", check=0, seed=0, threads=1, batch=1)
    pinned = _pinned_copy(model, config)
    auto.AUTO_METHODS = ("separable", "channel-svd")  # the grid's methods: fewer options to time
    table = LatencyTable(config.provider, config.threads)
    layers = auto.layer_options(pinned, config, table)
    curve = table.stream_curve()  # as the planner measures it
    sizes, costs = curve.points[-1]
    # one shared weight against STREAM_COUNT: the bytes the distinct chain adds over the shared
    per_byte = StreamCurve(((1.0, costs / (sizes * (STREAM_COUNT - 1) / STREAM_COUNT)),))
    names = [layer.node for layer in layers]
    baseline = bench([pinned], runs=RUNS, threads=1, batch=1)["median_ms"][0]
    original = auto._profiled(pinned, names, config)
    auto._scale_to_model(layers, original, baseline)
    index = {
        layer.node: {(o.method, tuple(o.rank or ())): j for j, o in enumerate(layer.options)}
        for layer in layers
    }
    plans = [{"/conv2/Conv": a, "/conv3/Conv": b} for a, b in itertools.product(CONV2, CONV3)]
    steps, models, foot = [], [], []
    for plan in plans:
        steps.append(Step(0.0, 0.0, [index[n].get(plan[n], 0) if n in plan else 0 for n in names]))
        models.append(build(pinned, config, None, plan)[0])
        foot.append(weight_bytes(models[-1]))
    loops = []
    for _ in range(LOOPS):  # each plan on the baseline's scale, all in one loop
        ms = bench([pinned, *models], runs=RUNS, threads=1, batch=1)["median_ms"]
        loops.append([baseline * t / ms[0] for t in ms[1:]])
    wall = np.median(np.array(loops), axis=0)
    profiles = [auto._profiled(m, names, config) for m in models]
    model_bytes = weight_bytes(pinned)

    def learned(anchors, stream=None):
        profile = lambda m: profiles[models.index(m)]  # noqa: E731
        in_place = auto.InPlace(layers, original, baseline, profile, None, stream, model_bytes)
        seen = {}  # (layer, method) -> [(footprint, factor, option's table ms)]
        for a in anchors:
            in_place.learn(steps[a], models[a], wall[a])
            for layer, c in zip(layers, steps[a].choices):
                if c:
                    key = (layer.node, layer.options[c].method)
                    seen.setdefault(key, []).append(
                        (foot[a], in_place.factor[key], layer.options[c].ms)
                    )
        return in_place, seen

    errors = {"factors only": [], "planner": [], "one cost per byte": []}
    errors.update({k: [] for k in ("footprint", "rank", "footprint slope", "average")})
    errors["footprint term"] = []
    pairs = []  # (planner's prediction, measured, footprint over its anchor) per target
    foot_of = {tuple(s.choices): f for s, f in zip(steps, foot)}
    foot_of[(0,) * len(layers)] = model_bytes

    def nearest_footprint(in_place, step) -> float:
        """Weight bytes of the anchor `in_place.predict(step)` starts from."""
        anchor, _ = in_place.built[in_place.nearest(step)[0]]
        return foot_of[tuple(anchor.choices)]

    single = {"factors only": [], "planner": [], "one cost per byte": []}
    for anchors in itertools.chain(
        ([a] for a in range(len(plans))), itertools.permutations(range(len(plans)), 2)
    ):
        for t in range(len(plans)):
            if t in anchors:
                continue
            in_place, seen = learned(anchors)

            def err(predicted, t=t):
                return abs(predicted - wall[t]) / wall[t]

            streamed = learned(anchors, curve)[0].predict(steps[t])
            linear = learned(anchors, per_byte)[0].predict(steps[t])
            got = errors if len(anchors) == 2 else single
            got["factors only"].append(err(in_place.predict(steps[t])))
            got["planner"].append(err(streamed))
            got["one cost per byte"].append(err(linear))
            if len(anchors) == 1:
                continue
            kept = dict(in_place.factor)
            for key, observed in seen.items():
                nearest = min(observed, key=lambda o: abs(np.log(o[0] / foot[t])))
                in_place.factor[key] = nearest[1]
            errors["footprint"].append(err(in_place.predict(steps[t])))
            for layer, c in zip(layers, steps[t].choices):
                key = (layer.node, layer.options[c].method)
                if c and key in seen:  # the factor seen at the option nearest in table time
                    target_ms = layer.options[c].ms
                    nearest = min(seen[key], key=lambda o: abs(np.log(o[2] / target_ms)))
                    in_place.factor[key] = nearest[1]
            errors["rank"].append(err(in_place.predict(steps[t])))
            slopes = {}  # layer -> d log(factor) / d weight bytes, where two anchors show it
            for (node, _), observed in seen.items():
                (f1, g1, _), (f2, g2, _) = observed[0], observed[-1]
                if abs(f2 - f1) > 2e5:  # at least 0.2 MB apart
                    slopes[node] = np.log(g2 / g1) / (f2 - f1)
            for (node, method), observed in seen.items():
                f, g, _ = min(observed, key=lambda o: abs(o[0] - foot[t]))
                change = np.exp(slopes.get(node, 0.0) * (foot[t] - f))
                in_place.factor[node, method] = g * float(np.clip(change, 0.5, 2.0))
            errors["footprint slope"].append(err(in_place.predict(steps[t])))
            in_place.factor = kept
            guesses, weights = [], []
            for anchor, ms in in_place.built:
                diffs = [
                    in_place._cost(layer, now) - in_place._cost(layer, was)
                    for layer, was, now in zip(layers, anchor.choices, steps[t].choices)
                ]
                guesses.append(ms + sum(diffs))
                weights.append(1.0 / max(sum(map(abs, diffs)), 1e-6))
            errors["average"].append(err(float(np.average(guesses, weights=weights))))
            # a footprint term on top of the planner's prediction: per MB of weights the
            # target adds over its anchor, what predicting one anchor from the other missed
            base, near = in_place.predict(steps[t]), nearest_footprint(in_place, steps[t])
            a1, a2 = sorted(anchors, key=lambda a: foot[a])
            gamma = 0.0
            if foot[a2] - foot[a1] >= FOOTPRINT_APART:
                missed = wall[a2] - learned([a1])[0].predict(steps[a2])
                gamma = float(np.clip(missed / (foot[a2] - foot[a1]), 0.0, MAX_GAMMA))
            errors["footprint term"].append(err(base + gamma * (foot[t] - near)))
            pairs.append((base, wall[t], foot[t] - near))

    def in_place_ratios(i: int) -> dict:
        """Each factored layer's in-place time (its profiled share of the plan's wall time)
        over its table time, and the rest of the graph's in-place ms."""
        inside, other = profiles[i]
        scale = wall[i] / (sum(inside.values()) + other)
        out = {
            layer.node: inside[layer.node] * scale / layer.options[c].ms
            for layer, c in zip(layers, steps[i].choices)
            if c
        }
        return {**out, "rest_ms": other * scale}

    def layer_ms(i: int) -> dict:
        """Every layer's table ms (scaled to the model) and in-place ms in plan i."""
        inside, other = profiles[i]
        scale = wall[i] / (sum(inside.values()) + other)
        return {
            layer.node: {"table": layer.options[c].ms, "in_place": inside[layer.node] * scale}
            for layer, c in zip(layers, steps[i].choices)
        }

    # the bound: one ms-per-byte for every pair, fitted on all of them (in-sample)
    base, measured, extra = (np.array(x) for x in zip(*pairs))
    weight = 1.0 / measured**2
    best_gamma = float(np.sum(weight * (measured - base) * extra) / np.sum(weight * extra**2))
    errors["footprint term, fitted on all (bound)"] = list(
        np.abs(base + best_gamma * extra - measured) / measured
    )
    result = {
        "baseline_ms": baseline,
        "fitted_ms_per_mb": best_gamma * 1e6,
        "plans": [
            {
                "choices": {k: [m, list(r)] for k, (m, r) in p.items()},
                "weight_bytes": f,
                "ms": w,
                "in_place_over_table": in_place_ratios(i),
                "layers_ms": layer_ms(i),
            }
            for i, (p, f, w) in enumerate(zip(plans, foot, map(float, wall)))
        ],
        "loops_ms": loops,
        "stream_curve_mb_ms": [[b / 1e6, c] for b, c in curve.points],
        "stream_ms_per_mb_one_cost": per_byte.points[0][1] * 1e6,
        "one_anchor": {k: summary(v) for k, v in single.items()},
        "two_anchors": {k: summary(v) for k, v in errors.items()},
    }
    print("weight-streaming curve: " + curve.describe())
    print(f"charnet baseline {baseline:.4f} ms; per plan: weights, wall time, in-place / table")
    for p in result["plans"]:
        label = " + ".join(f"{m} {'x'.join(map(str, r))}" for m, r in p["choices"].values())
        ratios = p["in_place_over_table"]
        print(
            f"  {label:<36} {p['weight_bytes'] / 1e6:5.2f} MB {p['ms']:.4f} ms  conv2"
            f" {ratios['/conv2/Conv']:.2f} conv3 {ratios['/conv3/Conv']:.2f}"
            f" rest {ratios['rest_ms']:.4f} ms"
        )
    print(f"{'predictor':<50}{'pairs':>7}{'within 15%':>12}{'median':>8}{'p90':>8}{'max':>8}")
    rows = [(f"one anchor, {k}", v) for k, v in result["one_anchor"].items()]
    rows += [(f"two anchors, {k}", v) for k, v in result["two_anchors"].items()]
    for name, s in rows:
        print(
            f"{name:<50}{s['n']:>7}{100 * s['within_15']:>11.1f}%{100 * s['median']:>7.1f}%"
            f"{100 * s['p90']:>7.1f}%{100 * s['max']:>7.1f}%"
        )
    with open(os.path.join(RESULTS, "latency_model.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
