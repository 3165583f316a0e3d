"""`--method auto`: build every layer's options, pick a plan for the user's target, check it
end to end in onnxruntime and correct it until the target is met (or say how close it came).

Targets: --speedup S (whole model, measured), --max-drop D with labelled --data (the fastest
plan within D points of accuracy), --max-error X with --data (the fastest plan within relative
output error X), or a per-layer --energy / --max-error (each layer's fastest option within it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import onnx

from .bench import bench
from .calibrate import Samples, fixed_batch
from .config import CLUSTERED, OptimizeConfig
from .datafit import DataContext, input_patches, patch_moments, patch_output_error
from .decompose.monochromatic import nearest_divisor
from .decompose.svd import relative_error
from .errors import LowRankError
from .graph import import_graph, weight_bytes
from .latency import CACHE_DIR, FLOAT_BYTES, LatencyTable, MatMulShape, StreamCurve
from .passes import CONV_PASSES
from .passes.base import ConvLayer, read_conv
from .passes.gemm import FcSVDPass, read_fc
from .passes.monochromatic import MAX_COLOR_CHANNELS
from .plan import (
    MAC_CUTS,
    LayerPlan,
    Option,
    Plan,
    Step,
    allocate,
    apply_step,
    fastest_within_error,
)
from .profile import kernel_times, layer_times, node_times

log = logging.getLogger(__name__)
AUTO_METHODS = ("separable", "channel-svd", "tucker2", "cp", "separable-basis", *CLUSTERED)
FITTED = ("cp", "separable-basis", *CLUSTERED)  # iterative fits: fewer candidate ranks
FITTED_CUTS = (2.0, 4.0, 8.0)
PLANNED_GROUPS = ((2, 2), (4, 4))  # bicluster-*: the (G, H) input/output clusterings tried
PLANNED_COLORS = (4, 8, 16, 32)  # monochromatic: C' (the nearest divisors of N) tried
OUTER_MAX_WORK = 12_000_000  # bicluster-outer: weight entries x K (~3 s of ALS a fit at most)
EXACT_TAIL = ("separable", "channel-svd")  # error = tail of the spectrum (Eckart-Young)
CP_MAX_WEIGHTS = 256 * 256 * 9  # CP candidates only for layers up to this size (fit time)
BASIS_MAX_CHANNELS = 8  # scheme 1 is a basis per input channel: for first layers only
WARM_UP_BEYOND = 1.25  # the trial build before the first plan: predicted this much faster
MAX_CORRECTIONS = 4  # measured builds beyond the first when bisecting for a speedup
REFINE_ROUNDS = 3  # quality targets: greedy paths searched past a move that broke the limit


def layer_options(
    pinned: onnx.ModelProto,
    config: OptimizeConfig,
    table: LatencyTable,
    workers: int | None = None,
    data: DataContext | None = None,
) -> list[LayerPlan]:
    """Every factorable layer with its options, errors and measured latencies. With calibration
    `data` (fit "data"), an option's error is the relative output error of the layer on input
    patches sampled from the calibration data, with the whitened fits the build will use;
    otherwise the relative weight error."""
    graph = import_graph(pinned)
    nodes = [n for n in graph.nodes if n.op in ("Conv", "Gemm", "MatMul")]
    convs = {n.name: read_conv(n) for n in nodes if n.op == "Conv"}
    convs = {k: v for k, v in convs.items() if not isinstance(v, str)}
    patches = {}
    if data is not None and data.calibration.fit == "data" and convs:
        patches = input_patches(data, list(convs.values()))
    plans, tasks = [], []
    for node in nodes:
        if node.name in convs:
            layer = convs[node.name]
            whiten = data is not None and data.calibration.whiten
            plans.append(_conv_options(layer, config, table, tasks, patches.get(node.name), whiten))
        elif node.op != "Conv" and config.fc:
            layer = read_fc(node)
            if not isinstance(layer, str) and layer.kind != "left":
                plans.append(_fc_options(layer, config, table))
    _fill_errors(tasks, config.seed, workers)
    table.save()
    return plans


def _conv_options(
    layer: ConvLayer,
    config: OptimizeConfig,
    table,
    tasks,
    patches: np.ndarray | None = None,
    whiten: bool = False,
) -> LayerPlan:
    in_shape = (config.batch, layer.in_channels, *layer.spatial_in)
    ms = table.measure([layer.shape], in_shape)
    options = [Option(None, None, layer.macs, 0.0, ms, FLOAT_BYTES * layer.shape.params)]
    for method in AUTO_METHODS:
        conv_pass = CONV_PASSES[method](seed=config.seed)
        if conv_pass.skip_reason(layer) or _too_costly(method, layer):
            continue
        whitening = conv_pass.whitening(layer) if whiten and patches is not None else None
        layer.moments = whitening and patch_moments(patches, layer.group, whitening.kernel)
        exact = method in EXACT_TAIL
        spectra = conv_pass.spectra(layer)[0] if exact and patches is None else None
        seen = set()
        for rank in _candidate_ranks(conv_pass, layer, config.rank_multiple):
            macs = conv_pass.chain_macs(layer, rank)
            if rank in seen or macs >= layer.macs:
                continue
            seen.add(rank)
            layout = conv_pass.layout(layer, rank)
            ms, params = table.measure(layout, in_shape), sum(shape.params for shape in layout)
            option = Option(method, list(rank), macs, -1.0, ms, FLOAT_BYTES * params)
            if spectra is not None:
                tail = sum(float((s[rank[0] :] ** 2).sum()) for s in spectra)
                option.error = float(np.sqrt(tail / sum(float((s**2).sum()) for s in spectra)))
            elif exact:  # closed-form whitened fits: cheap enough to run here
                approx = conv_pass.factor(layer, rank).reconstruct()
                option.error = patch_output_error(layer.weight, approx, patches, layer.group)
            else:
                tasks.append((option, method, layer, patches, layer.moments))
            options.append(option)
        layer.moments = None
    return LayerPlan(layer.node.name, "Conv", options)


def _candidate_ranks(conv_pass, layer: ConvLayer, multiple: int):
    """The ranks a method is planned at: those cutting the MACs 1.4x to 16x (2x, 4x, 8x for
    iterative fits); for the clustered methods, rank tuples that also name the clustering
    (bicluster-*: (G, H, ranks) for each of PLANNED_GROUPS; monochromatic: (C',))."""
    method = conv_pass.method
    if method == "monochromatic":
        n = layer.out_channels
        yield from ((nearest_divisor(n, c),) for c in PLANNED_COLORS if c < n)
    elif method in CLUSTERED:
        c, n = layer.in_channels, layer.out_channels
        for groups in [(g, h) for g, h in PLANNED_GROUPS if c % g == 0 and n % h == 0]:
            for cut in FITTED_CUTS:
                rank = conv_pass.speedup_rank(layer, groups, cut, multiple)
                if rank is not None and not _outer_too_costly(method, layer, rank):
                    yield rank
    else:
        for cut in FITTED_CUTS if method in FITTED else MAC_CUTS:
            yield conv_pass.rank_for_speedup(layer, cut, multiple)


def _too_costly(method: str, layer: ConvLayer) -> bool:
    """Candidates whose fit would dominate planning time for little chance of winning."""
    if method == "separable-basis":
        return layer.in_channels > BASIS_MAX_CHANNELS
    if method == "monochromatic":  # as the pass itself: first layers only
        return layer.in_channels > MAX_COLOR_CHANNELS
    return method == "cp" and layer.weight.size > CP_MAX_WEIGHTS


def _outer_too_costly(method: str, layer: ConvLayer, rank: tuple[int, ...]) -> bool:
    """bicluster-outer's ALS fit grows with the weight and the outer rank K."""
    return method == "bicluster-outer" and layer.weight.size * rank[-1] > OUTER_MAX_WORK


def _fc_options(layer, config: OptimizeConfig, table) -> LayerPlan:
    k, m = layer.matrix.shape
    in_shape = (layer.rows * config.batch, k)
    ms = table.measure([MatMulShape(k, m)], in_shape)
    options = [Option(None, None, layer.macs, 0.0, ms, FLOAT_BYTES * k * m)]
    fc_pass = FcSVDPass()
    s2 = fc_pass.spectra(layer)[0][0] ** 2
    seen = set()
    for cut in MAC_CUTS:
        rank = fc_pass.rank_for_speedup(layer, cut, config.rank_multiple)
        macs = fc_pass.chain_macs(layer, rank)
        if rank in seen or macs >= layer.macs:
            continue
        seen.add(rank)
        ms = table.measure([MatMulShape(k, rank[0]), MatMulShape(rank[0], m)], in_shape)
        error = float(np.sqrt(s2[rank[0] :].sum() / s2.sum())) if s2.sum() else 0.0
        nbytes = FLOAT_BYTES * rank[0] * (k + m)
        options.append(Option("fc-svd", list(rank), macs, error, ms, nbytes))
    return LayerPlan(layer.node.name, layer.node.op, options)


def _fill_errors(tasks, seed: int, workers: int | None) -> None:
    """Fit the candidates whose error needs a real decomposition, in worker processes, with a
    disk cache keyed by (weight hash, method, rank, seed)."""
    cache = _FitCache()
    todo = []
    for option, method, layer, patches, moments in tasks:
        key = cache.key(layer.weight, method, option.rank, seed, patches, moments is not None)
        if key in cache.entries:
            option.error = cache.entries[key]
        else:
            todo.append((key, option, method, layer, patches, moments))
    if todo:
        jobs = [
            (method, layer.weight, layer.geometry, layer.spatial_in, tuple(o.rank), seed, moments)
            for _, o, method, layer, _, moments in todo
        ]
        workers = workers or min(len(jobs), os.cpu_count() or 1)
        if workers > 1:  # one BLAS thread per worker: oversubscribed BLAS is many times slower
            with ProcessPoolExecutor(workers, initializer=_one_blas_thread) as pool:
                approximations = list(pool.map(_fit, jobs))
        else:
            approximations = [_fit(job) for job in jobs]
        for (key, option, _, layer, patches, _), approx in zip(todo, approximations):
            error = (
                relative_error(approx, layer.weight)
                if patches is None
                else patch_output_error(layer.weight, approx, patches, layer.group)
            )
            option.error = cache.entries[key] = error
        cache.save()


def _one_blas_thread() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _fit(job) -> np.ndarray:
    """The weight a method's fit (whitened by `moments` when given) reconstructs at a rank."""
    method, weight, geometry, spatial, rank, seed, moments = job
    layer = ConvLayer(None, weight, None, geometry, list(spatial), True, moments)
    return CONV_PASSES[method](seed=seed).factor(layer, rank).reconstruct()


class _FitCache:
    """Fit errors from earlier runs, so a second run with another target refits nothing."""

    def __init__(self) -> None:
        self.path = os.path.join(CACHE_DIR, "fit-errors.json")
        try:
            with open(self.path, encoding="utf-8") as f:
                self.entries = json.load(f)
        except (OSError, ValueError):
            self.entries = {}

    @staticmethod
    def key(
        weight: np.ndarray, method: str, rank, seed: int, patches=None, whitened: bool = False
    ) -> str:
        """(weight hash, method, rank, seed) and the fit: weights, or data and which data
        (and whether the fit was whitened on it)."""
        digest = hashlib.sha1(np.ascontiguousarray(weight).tobytes()).hexdigest()[:16]
        fit = "weights"
        if patches is not None:
            fit = "data:" + hashlib.sha1(np.ascontiguousarray(patches).tobytes()).hexdigest()[:16]
            fit += ":whitened" if whitened else ""
        return f"{digest}|{weight.shape}|{method}|{list(rank)}|{seed}|{fit}"

    def save(self) -> None:
        try:
            os.makedirs(CACHE_DIR, exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only home must not stop the run
            log.warning("cannot save the fit cache: %s", exc)


def plan_for_target(
    layers: list[LayerPlan],
    baseline_ms: float,
    config: OptimizeConfig,
    build,
    evaluate,
    in_place: InPlace | None = None,
) -> tuple[Plan, object]:
    """Choose the plan for the config's target. `build(plan)` makes (model, records);
    `evaluate(model)` gives {"speedup": measured, "drop" / "error": quality} as needed."""
    plan = Plan(
        layers,
        baseline_ms,
        config.provider,
        config.batch,
        config.threads,
        target=config.planner_target(),
    )
    kind, value = plan.target["kind"], plan.target["value"]
    if kind in ("energy", "error"):
        fastest_within_error(layers, value if kind == "error" else float(np.sqrt(1 - value)))
        return plan, build(plan)
    path = allocate(layers, baseline_ms)
    plan.path = [{"predicted_ms": s.ms, "error": float(np.sqrt(s.error2))} for s in path]
    if kind == "speedup":
        return _meet_speedup(plan, path, value, build, evaluate, in_place)
    return _meet_quality(plan, path, kind, value, build, evaluate, in_place)


class InPlace:
    """What the plans built so far taught about the latency model.

    The table times each chain alone; inside the model a chain can run slower or faster (its
    weights evicted from the cache by the other layers, or kept hot in a small compressed
    model), and the rest of the graph changes with the layouts the chains leave. After each
    plan is built and timed, onnxruntime's profile of it gives each factored layer's time in
    place: that layer's options of the same method are then scaled by (in-place / table) of
    the option that ran.
    `predict(step)` is what the planner expects of a step before building it: the measured time
    of the nearest step built so far, plus the (scaled) differences of the layers whose choice
    differs, plus the change in the cost of streaming the model's weights (the machine's
    measured curve at the step's total weight bytes minus at the anchor's): a layer's in-place
    time also depends on how much weight the OTHER layers hold (on charnet conv3 as channel-svd
    48 ran 1.5x its table time beside conv2 separable 16 and 2.1x beside separable 120;
    benchmarks/latency_model.py), which no per-layer factor carries. Anchoring on a
    measurement keeps what no per-layer model sees (the rest of the graph, the session's
    per-run cost, the profiler's per-kernel cost) out of the prediction, which matters most in
    models that run in tens of microseconds. `warm_up` learns from a quick trial build before
    the first plan, so that one is predicted so too."""

    def __init__(
        self,
        layers: list[LayerPlan],
        original: tuple,
        baseline_ms: float,
        profile,
        trial=None,
        stream: StreamCurve | None = None,
        model_bytes: float = 0.0,
    ):
        inside, other = original
        total = sum(inside.values()) + other
        self.scale = baseline_ms / total if total > 0 else 1.0
        self.layers = layers
        self.profile = profile  # model -> (ms per layer, ms of the rest), as `original`
        # step -> (model, measured ms): the step's architecture built fast (weight-only fits)
        self.trial = trial
        # (layer, method) -> in-place / table time: a chain's behaviour in the model (its
        # weights' footprint, its kernels' count) depends on the method more than on the rank
        self.factor: dict[tuple[str, str], float] = {}
        # (step, measured ms) of the original and of every build learned from
        self.built: list[tuple] = [(Step(baseline_ms, 0.0, [0] * len(layers)), baseline_ms)]
        self.changed = 0  # layers the last prediction changed from its anchor
        # the cost of streaming the model's weights by their total (LatencyTable.stream_curve):
        # a layer's in-place time depends on the other layers' weights too (cache), which the
        # factors of the layers that change do not carry; `model_bytes`: the original model's
        # weights, of which those outside the planned layers stay in every step
        self.stream = stream
        planned = sum(layer.options[0].weight_bytes for layer in layers)
        self.other_bytes = max(0.0, model_bytes - planned)

    @property
    def learned(self) -> bool:
        return len(self.built) > 1

    def warm_up(self, path, index: int) -> None:
        """Learn from a trial build of another step before `path[index]` is built: the first
        step past it that is predicted WARM_UP_BEYOND x faster and keeps the method of every
        layer it factors (further along the greedy path each layer is factored at least as
        far, so the first plan's layers and methods all get learned factors); else the next
        step; when `index` is the last, the one before it. Only the architecture matters for
        timing: the trial uses weight-only fits."""
        if self.trial is None or self.learned or len(path) < 2:
            return
        if index < len(path) - 1:
            here = path[index]
            alike = (
                i
                for i in range(index + 1, len(path))
                if path[i].ms <= here.ms / WARM_UP_BEYOND and self._same_methods(here, path[i])
            )
            pick = next(alike, index + 1)
        else:
            pick = index - 1 if index > 1 else index
        model, measured_ms = self.trial(path[pick])
        self.learn(path[pick], model, measured_ms)

    def _same_methods(self, step, other) -> bool:
        """Does `other` factor every layer `step` factors, with the same method?"""
        for layer, mine, theirs in zip(self.layers, step.choices, other.choices):
            if mine and layer.options[theirs].method != layer.options[mine].method:
                return False
        return True

    def nearest(self, step) -> tuple[int, list[float]]:
        """The built step a prediction of `step` starts from — the one that leaves the least
        to predict (the smallest sum of the layers' absolute cost differences), so a far step
        whose layers all match but one does not win over a near one that differs a little in
        two — as its index in `built`, with those layer cost differences."""
        differences = [
            [
                self._cost(layer, now) - self._cost(layer, was)
                for layer, was, now in zip(self.layers, anchor.choices, step.choices)
            ]
            for anchor, _ in self.built
        ]
        index = min(range(len(self.built)), key=lambda i: sum(map(abs, differences[i])))
        return index, differences[index]

    def predict(self, step) -> float:
        """The nearest built step's measured time plus the differences in layer cost and the
        cost of streaming the weight bytes `step` adds over it."""
        index, differences = self.nearest(step)
        anchor, ms = self.built[index]
        self.changed = sum(a != b for a, b in zip(anchor.choices, step.choices))
        streaming = 0.0
        if self.stream is not None:
            streaming = self.stream.ms(self.footprint(step)) - self.stream.ms(
                self.footprint(anchor)
            )
        return ms + sum(differences) + streaming

    def footprint(self, step) -> float:
        """Bytes of weights the model holds at `step`."""
        return self.other_bytes + sum(
            layer.options[choice].weight_bytes for layer, choice in zip(self.layers, step.choices)
        )

    def _cost(self, layer: LayerPlan, choice: int) -> float:
        option = layer.options[choice]
        return option.ms * (self.factor.get((layer.node, option.method), 1.0) if choice else 1.0)

    def learn(self, step, model: onnx.ModelProto, measured_ms: float) -> None:
        """Keep `step`'s measured time and update the factors of the layers it factors from
        its in-place profile (`model` is the step built). Each profile is put on the scale of
        its own model's wall time: the profiler's per-kernel cost weighs more in a model of
        many small kernels (a chain) than in the original."""
        inside, other = self.profile(model)
        total = sum(inside.values()) + other
        scale = measured_ms / total if total > 0 and measured_ms > 0 else self.scale
        for layer, choice in zip(self.layers, step.choices):
            option = layer.options[choice]
            if choice and option.ms > 0 and inside.get(layer.node, 0) > 0:
                self.factor[layer.node, option.method] = inside[layer.node] * scale / option.ms
        self.built.append((step, measured_ms))


def _meet_speedup(plan: Plan, path, target: float, build, evaluate, in_place=None):
    """The earliest step of the path (least error) whose MEASURED speedup meets the target.

    Start at the step the latency model predicts, then bisect on measurements: the measured
    speedup grows along the path, and taking the earliest step that meets it (not the fastest
    one seen) keeps a noisy prediction from overshooting into a much less accurate plan."""
    budget = plan.baseline_ms / target
    first = next((i for i, s in enumerate(path) if s.ms <= budget), len(path) - 1)
    if in_place is not None:
        in_place.warm_up(path, first)
        if in_place.learned:  # start where the corrected latency model meets the target
            first = next(
                (i for i, s in enumerate(path) if in_place.predict(s) <= budget), len(path) - 1
            )
    measured: dict[int, tuple[float, tuple]] = {}
    corrected: dict[int, tuple] = {}

    def speedup_at(index: int) -> float:
        if index not in measured:
            result, built, corrected[index] = _try(plan, path[index], build, evaluate, in_place)
            measured[index] = (result["speedup"], built)
        return measured[index][0]

    lo, hi = 0, len(path) - 1  # invariant: the answer is in [lo, hi]
    probe = first
    for _ in range(MAX_CORRECTIONS + 2):
        if speedup_at(probe) >= target:
            hi = probe
        else:
            lo = probe + 1
        if lo >= hi:
            break
        probe = (lo + hi) // 2
    meets = [i for i, (speedup, _) in measured.items() if speedup >= target]
    best = min(meets) if meets else max(measured, key=lambda i: measured[i][0])
    apply_step(plan.layers, path[best])
    speedup, built = measured[best]
    plan.measured_ms = plan.baseline_ms / speedup
    plan.corrected_ms, plan.corrected_changed = corrected[best]
    if speedup < target:
        plan.notes.append(f"target {target:g}x not met: best measured {speedup:.2f}x")
    return plan, built


def _meet_quality(plan: Plan, path, kind: str, limit: float, build, evaluate, in_place=None):
    """The fastest plan found whose measured quality loss is within `limit`.

    Bisect the greedy path on measurements (the loss grows along it). The step just past the
    last one within the limit moved one layer too far, but the other layers may still have
    room: the path ranks moves by weight or calibration error, a poor proxy of what a cut
    costs in accuracy. So the search goes on from that last step along a new greedy path on
    which the layer takes no option as fast as the one that broke the limit, and bisects it
    too (REFINE_ROUNDS times at most). The fastest measured plan within the limit wins."""
    if in_place is not None:
        in_place.warm_up(path, (len(path) - 1) // 2)
    chosen, banned, lo, rounds = None, set(), 0, 0
    while True:
        index, found = _bisect_quality(plan, path, lo, kind, limit, build, evaluate, in_place)
        if index < 0:
            raise LowRankError(f"no plan keeps the {kind} within {limit:g}")
        if found is not None and (chosen is None or found[2] < chosen[1][2]):
            chosen = (path[index], found)
        if index + 1 >= len(path) or rounds == REFINE_ROUNDS:
            break
        start, over = path[index], path[index + 1]
        (layer,) = [i for i, (a, b) in enumerate(zip(start.choices, over.choices)) if a != b]
        options = plan.layers[layer].options
        too_far = options[over.choices[layer]].ms
        banned |= {(layer, j) for j, o in enumerate(options) if o.ms <= too_far}
        path = allocate(plan.layers, plan.baseline_ms, start=start, banned=frozenset(banned))
        if len(path) < 2:
            break
        lo, rounds = 1, rounds + 1
    step, (built, loss, measured_ms, corrected) = chosen
    apply_step(plan.layers, step)
    plan.measured_ms, (plan.corrected_ms, plan.corrected_changed) = measured_ms, corrected
    plan.notes.append(f"{kind} {loss:.4g} within {limit:g}")
    if rounds:
        plan.notes.append(
            f"searched {rounds} more greedy path(s) past the moves that broke the limit"
        )
    return plan, built


def _bisect_quality(plan: Plan, path, lo: int, kind, limit, build, evaluate, in_place):
    """Bisect path[lo:] for the last step within the limit (path[lo - 1] is known to be):
    (its index, (built, loss, measured ms, corrected)); (lo - 1, None) when none of them is."""
    hi, best = len(path) - 1, (lo - 1, None)
    while lo <= hi:
        mid = (lo + hi) // 2
        result, built, corrected = _try(plan, path[mid], build, evaluate, in_place)
        loss = result[kind]
        if loss <= limit:
            best = (mid, (built, loss, plan.baseline_ms / result["speedup"], corrected))
            lo = mid + 1
        else:
            hi = mid - 1
    return best


def _try(plan: Plan, step, build, evaluate, in_place) -> tuple[dict, tuple, tuple]:
    """Build and measure one step of the path: (evaluation, built, (corrected prediction,
    layers it changed) made before building); what it measured teaches `in_place`."""
    corrected = _corrected(in_place, step)
    apply_step(plan.layers, step)
    built = build(plan)
    result = _evaluate(plan, step, built, evaluate, *corrected)
    if in_place is not None:
        in_place.learn(step, built[0], plan.baseline_ms / result["speedup"])
    return result, built, corrected


def _corrected(in_place, step) -> tuple[float | None, int | None]:
    """The in-place prediction of a step about to be built, and how many layers' choices it
    changed from the measured plan it started from (0: that architecture was measured, as a
    trial); (None, None) before anything was built."""
    if in_place is None or not in_place.learned:
        return None, None
    return in_place.predict(step), in_place.changed


def _evaluate(
    plan: Plan, step, built, evaluate, corrected: float | None = None, changed: int | None = None
) -> dict:
    """Measure a built plan and keep the point for the report and the Pareto chart."""
    result = evaluate(built[0])
    plan.trace.append(
        {
            "predicted_ms": step.ms,
            "corrected_ms": corrected,
            "corrected_from_layers_changed": changed,
            "measured_ms": plan.baseline_ms / result["speedup"],
            "error": float(np.sqrt(step.error2)),
            **result,
        }
    )
    return result


TIMING_BUDGET_MS = 1000.0  # per model and measurement: fast models get more runs (less noise)
MIN_RUNS, MAX_RUNS = 20, 200


def timed(
    models: list[onnx.ModelProto],
    config: OptimizeConfig,
    runs: int = MIN_RUNS,
    feeds: list[dict] | None = None,
) -> dict:
    """Latency of the models side by side (bench.py) at the config's provider, batch and
    threads (on `feeds` when given, else random inputs)."""
    return bench(
        models,
        config.provider,
        runs=runs,
        warmup=3,
        threads=config.threads,
        batch=config.batch,
        seed=config.seed,
        feeds=feeds,
    )


def timing_feeds(data, config: OptimizeConfig, count: int = 3) -> list[dict] | None:
    """Up to `count` feeds of the config's batch from the calibration samples (None without
    them): the planner times models on real inputs where it has some."""
    if data is None:
        return None
    batch = config.batch or 1
    feeds = list(itertools.islice(data.samples.batches(batch), count))
    feeds = [f for f in feeds if len(next(iter(f.values()))) == batch]
    return feeds or None


def runs_for(latency_ms: float) -> int:
    """Timed runs per model so a measurement takes about TIMING_BUDGET_MS: a sub-millisecond
    model is timed 200 times (its medians move by 20% over 20 runs on a busy machine), a slow
    one 20 times."""
    if latency_ms <= 0:
        return MAX_RUNS
    return int(min(MAX_RUNS, max(MIN_RUNS, TIMING_BUDGET_MS / latency_ms)))


def measure_speedup(
    original: onnx.ModelProto,
    optimized: onnx.ModelProto,
    config,
    runs: int = MIN_RUNS,
    feeds: list[dict] | None = None,
) -> float:
    """End-to-end speedup of `optimized` over `original`, timed side by side."""
    return timed([original, optimized], config, runs, feeds)["speedup"]


def run_planner(
    pinned: onnx.ModelProto, config: OptimizeConfig, data, build, evaluation: Samples | None = None
):
    """Plan (or load `config.plan_path`) and build the model; returns (plan, (model, records)).
    With calibration data, every timing and profile runs on calibration inputs; `evaluation`
    (--data, read by the caller) gives the quality of each measured plan."""
    feeds = timing_feeds(data, config)
    feed = feeds[0] if feeds else None

    def profiled(model) -> tuple[dict[str, float], float]:
        return _profiled(model, names, config, feed)

    if config.plan_path:
        try:
            plan = Plan.load(config.plan_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LowRankError(f"{config.plan_path}: not a readable plan ({exc})") from None
        built = build(pinned, config, data, plan.choices())
        names = [layer.node for layer in plan.layers]
        profile_layers(plan, profiled(pinned), profiled(built[0]))
        return plan, built
    table = LatencyTable(config.provider, config.threads)
    layers = layer_options(pinned, config, table, data=data)
    data_errors = data is not None and data.calibration.fit == "data"
    runs = runs_for(timed([pinned], config, feeds=feeds)["median_ms"][0])
    baseline = timed([pinned], config, runs, feeds)["median_ms"][0]
    names = [layer.node for layer in layers]
    original = profiled(pinned)  # for the prediction and the report
    scaled = _scale_to_model(layers, original, baseline)
    quality = _Quality(pinned, config, evaluation)

    def evaluate(model):
        return {"speedup": measure_speedup(pinned, model, config, runs, feeds), **quality(model)}

    def build_plan(plan):
        return build(pinned, config, data, plan.choices())

    def trial(step):
        apply_step(layers, step)
        model = build(pinned, config, None, Plan(layers, baseline).choices())[0]
        return model, baseline / measure_speedup(pinned, model, config, runs, feeds)

    stream = table.stream_curve()
    table.save()
    in_place = InPlace(layers, original, baseline, profiled, trial, stream, weight_bytes(pinned))
    plan, built = plan_for_target(layers, baseline, config, build_plan, evaluate, in_place)
    plan.notes.append(
        f"{scaled} of {len(layers)} layers' timings scaled to their profiled share of the model"
    )
    plan.notes.append(f"cost of streaming the weights (measured): {stream.describe()}")
    if data_errors:
        plan.notes.append("conv errors: relative output error on calibration input patches")
    if feeds:
        plan.notes.append("timed on calibration inputs")
    profile_layers(plan, original, profiled(built[0]))
    return plan, built


def _profiled(
    model, names: list[str], config: OptimizeConfig, feed: dict | None = None
) -> tuple[dict[str, float], float]:
    """Each named layer's time inside `model` and the rest of the graph's, from onnxruntime's
    profiler (which adds a little per-kernel overhead); on `feed` when given."""
    kernels = kernel_times(
        model, config.provider, config.batch, config.threads, seed=config.seed, feed=feed
    )
    return layer_times(node_times(model, kernels), names)


def profile_layers(plan: Plan, original: tuple, optimized: tuple) -> None:
    """Record each layer's measured time inside the original and the optimized model (both
    `_profiled`), for the predicted-vs-measured table."""
    for layer in plan.layers:
        layer.profiled_ms = [original[0][layer.node], optimized[0][layer.node]]
    plan.profiled_other_ms = [original[1], optimized[1]]


def _scale_to_model(layers: list[LayerPlan], original: tuple, baseline_ms: float) -> int:
    """Put each layer's option timings on the scale of the whole model as it runs now.

    The table's timings come from one-layer models, possibly measured on another day's load
    and without the neighbours' cache effects. Each layer's original time is instead taken
    from onnxruntime's profile of the whole model (its kernels' share of the measured
    baseline), and all its options are scaled by the same factor, so the table only supplies
    the ratios between a layer's options. Layers the profile does not find keep the table's
    timings, scaled down only if the table would not fit inside the baseline. Returns the
    number of layers scaled from the profile (`original`: `_profiled` of the model)."""
    inside, other = original
    profiled = sum(inside.values()) + other
    found = [layer for layer in layers if inside[layer.node] > 0 and layer.options[0].ms > 0]
    for layer in found:
        factor = inside[layer.node] * baseline_ms / profiled / layer.options[0].ms
        for option in layer.options:
            option.ms *= factor
    rest = [layer for layer in layers if layer not in found]
    budget = baseline_ms - sum(layer.options[0].ms for layer in found)
    total = sum(layer.options[0].ms for layer in rest)
    scale = min(1.0, 0.98 * budget / total) if total > 0 and budget > 0 else 1.0
    for layer in rest:
        for option in layer.options:
            option.ms *= scale
    return len(found)


class _Quality:
    """Accuracy drop (points, with labels) and max relative output error on --data."""

    def __init__(self, reference: onnx.ModelProto, config: OptimizeConfig, samples: Samples | None):
        self.reference, self.config, self.samples = reference, config, samples

    def __call__(self, model) -> dict:
        if self.samples is None:
            return {}
        from .validate import compare

        feeds = list(self.samples.batches(fixed_batch(self.reference, self.samples) or 64))
        result = compare(self.reference, model, feeds, self.samples.labels, self.config.provider)
        out = {"output_error": result["max_rel_error"]}
        if "accuracy_reference" in result:
            out["drop"] = 100 * (result["accuracy_reference"] - result["accuracy_candidate"])
        return out
