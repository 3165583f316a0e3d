"""The planner's clustered candidates (Denton et al.): monochromatic and bicluster-svd/-outer
options, and plans naming them (groups and colours in the rank) that rebuild their chains."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from modelgen import assert_same_outputs, attr, conv_model, ops, run

import onnx_lowrank
from onnx_lowrank.auto import layer_options
from onnx_lowrank.config import OptimizeConfig
from onnx_lowrank.latency import LatencyTable
from onnx_lowrank.plan import LayerPlan, Option, Plan

FIRST = [1, 3, 16, 16]  # a first layer: 3 input channels
INNER = [1, 16, 12, 12]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The planner's options for a first layer (monochromatic by construction at 4 colours)
    and an inner layer, computed once: (model, LayerPlan) for each."""
    cache = str(tmp_path_factory.mktemp("cache"))
    rng = np.random.default_rng(0)
    first = conv_model(_monochromatic_weight(rng, 16, 3, 4), FIRST, {"pads": [2, 2, 2, 2]})
    inner = conv_model(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), INNER)
    config = OptimizeConfig.from_options(method="auto", speedup=2.0)
    table = LatencyTable("cpu", cache_dir=cache, runs=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("onnx_lowrank.auto.CACHE_DIR", cache)
        return {
            name: (model, layer_options(model, config, table, workers=1)[0])
            for name, model in (("first", first), ("inner", inner))
        }


def _choose(layer: LayerPlan, method: str, prefix: list[int]) -> LayerPlan:
    """A copy of the layer's plan with the first option of `method` whose rank starts so."""
    layer = copy.deepcopy(layer)
    layer.choice = next(
        i
        for i, o in enumerate(layer.options)
        if o.method == method and o.rank[: len(prefix)] == prefix
    )
    return layer


def _optimized(model, layer, tmp_path):
    """Save the layer's plan, load it back and apply it as `--plan FILE` does."""
    path = tmp_path / "plan.json"
    Plan([layer], baseline_ms=1.0).save(path)
    assert Plan.load(path).choices() == Plan([layer], baseline_ms=1.0).choices()
    out, report = onnx_lowrank.optimize(model, plan_path=str(path), check=0)
    (record,) = report.records
    assert record.status == "rewritten", record.reason
    return out, record


def _monochromatic_weight(rng, n: int, c: int, colors: int) -> np.ndarray:
    """Filters that each read one of `colors` colour lines: monochromatic at C' = colors."""
    lines = rng.standard_normal((colors, c))
    spatial = rng.standard_normal((n, 5, 5))
    return np.einsum("fc,fyx->fcyx", lines[np.arange(n) % colors], spatial).astype(np.float32)


def test_options_include_the_clustered_methods(planned):
    assert "monochromatic" in {o.method for o in planned["first"][1].options}
    by_method = {}
    for option in planned["inner"][1].options[1:]:
        by_method.setdefault(option.method, []).append(option)
    assert "monochromatic" not in by_method  # 16 input channels: not a first layer
    for method, slots in (("bicluster-svd", 4), ("bicluster-outer", 3)):
        assert {tuple(o.rank[:2]) for o in by_method[method]} == {(2, 2), (4, 4)}
        for option in by_method[method]:
            assert len(option.rank) == slots and 0 < option.error < 1 and option.ms >= 0


@pytest.mark.parametrize("method", ["bicluster-svd", "bicluster-outer"])
def test_a_planned_bicluster_option_is_the_chain_built(method, planned, tmp_path):
    model, layer = planned["inner"]
    layer = _choose(layer, method, [4, 4])
    option = layer.chosen
    out, record = _optimized(model, layer, tmp_path)
    assert record.method == method and "G=4, H=4" in record.detail
    assert record.rank == (option.rank[2:] if method == "bicluster-svd" else option.rank[2])
    assert abs(record.fit_error - option.error) < 1e-3 and record.macs_after == option.macs
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert [attr(n, "group") for n in convs][::2] == [4, 4]  # first 1x1 and last 1x1


def test_a_full_rank_bicluster_plan_reproduces_the_layer(tmp_path):
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    model = conv_model(weight, INNER, {"pads": [1, 1, 1, 1]}, bias)
    full = [2, 2, 8, 16]  # (G, H, min(C/G, ...), min(N/H, ...)): every block kept whole
    options = [Option(None, None, 0, 0.0, 1.0), Option("bicluster-svd", full, 0, 0.0, 0.5)]
    out, record = _optimized(model, LayerPlan("conv", "Conv", options, choice=1), tmp_path)
    assert record.rank == [8, 16] and record.fit_error < 1e-5
    x = rng.standard_normal(INNER).astype(np.float32)
    assert_same_outputs(model, out, {"x": x})


def test_a_planned_monochromatic_option_on_a_first_layer(planned, tmp_path):
    model, layer = planned["first"]
    layer = _choose(layer, "monochromatic", [4])
    assert layer.chosen.error < 1e-5  # the weight is monochromatic at 4 colours
    out, record = _optimized(model, layer, tmp_path)
    assert record.method == "monochromatic" and record.rank == 4
    assert ops(out)[:2] == ["Conv", "Conv"] and attr(out.graph.node[1], "group") == 4
    x = np.random.default_rng(3).standard_normal(FIRST).astype(np.float32)
    assert_same_outputs(model, out, {"x": x})
    (y,) = run(out, {"x": x})
    assert y.shape == (1, 16, 16, 16)
