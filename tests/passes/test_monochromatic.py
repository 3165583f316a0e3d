"""Monochromatic pass: exact on kernels made of C' colour lines (or C' = N), over random
strides, dilations, pads, bias and kernel shapes; colour choice, skips and the detail text."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelgen import assert_same_outputs, attr, conv_model, geometry, ops

import onnx_lowrank as ol

EXAMPLES = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))


def colour_kernel(rng, n: int, c: int, kernel, colors: int) -> np.ndarray:
    """N filters, each one colour line (of `colors`, n/colors filters each, random signs)
    times a spatial filter: exactly what the monochromatic form represents."""
    if colors <= c:
        lines = np.linalg.qr(rng.standard_normal((c, c)))[0][:colors]  # well apart
    else:
        lines = rng.standard_normal((colors, c))
    labels = rng.permutation(np.repeat(np.arange(colors), n // colors))
    colour = lines[labels] * rng.choice([-1.0, 1.0], n)[:, None]
    spatial = rng.standard_normal((n, *kernel))
    return np.einsum("nc,nyx->ncyx", colour, spatial).astype(np.float32)


@EXAMPLES
@given(geometry(), st.data())
def test_monochromatic_exact_on_colour_kernels(geo, data):
    kernel, attrs, size = geo
    c = data.draw(st.integers(1, 4))
    colors = data.draw(st.integers(1, c))
    n = colors * data.draw(st.integers(1, 4))
    colors = data.draw(st.sampled_from([colors, n]))  # C' colour lines, or C' = N
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    bias = rng.standard_normal(n).astype(np.float32) if data.draw(st.booleans()) else None
    model = conv_model(colour_kernel(rng, n, c, kernel, colors), ["N", c, *size], attrs, bias)
    out, report = ol.optimize(model, method="monochromatic", colors=colors, force=True, check=0)
    (record,) = report.records
    assert record.status == "rewritten" and record.fit_error < 1e-5, record
    assert record.rank == colors and ops(out)[:2] == ["Conv", "Conv"]
    x = rng.standard_normal((data.draw(st.integers(1, 2)), c, *size)).astype(np.float32)
    assert_same_outputs(model, out, {"x": x})


def _first_layer(n=12, c=3, colors=4, seed=0):
    rng = np.random.default_rng(seed)
    w = colour_kernel(rng, n, c, (5, 5), colors)
    attrs = {"strides": [2, 2], "pads": [2, 1, 2, 1]}
    return conv_model(w, [1, c, 20, 20], attrs, rng.standard_normal(n).astype(np.float32)), rng


def test_structure_and_graph_output_gets_a_gather():
    model, rng = _first_layer()
    out, report = ol.optimize(model, method="monochromatic", colors=4, check=0, force=True)
    colours, spatial, gather = out.graph.node
    assert attr(colours, "kernel_shape") == [1, 1] and attr(colours, "pads") == [0, 0, 0, 0]
    assert attr(spatial, "group") == 4 and attr(spatial, "strides") == [2, 2]
    assert attr(spatial, "pads") == [2, 1, 2, 1] and len(spatial.input) == 3
    assert gather.op_type == "Gather" and gather.output[0] == "y"
    detail = report.records[0].detail
    assert "4 colours" in detail and "output order restored by Gather" in detail
    assert "graph output" in detail
    assert_same_outputs(model, out, {"x": rng.standard_normal((1, 3, 20, 20)).astype(np.float32)})


def test_colors_not_dividing_n_take_the_nearest_divisor():
    model, _ = _first_layer(n=12, colors=4)
    _, report = ol.optimize(model, method="monochromatic", colors=5, check=0, force=True)
    record = report.records[0]
    assert record.rank == 6 and "--colors 5 does not divide N=12" in record.detail


def test_many_input_channels_are_skipped_unless_forced():
    rng = np.random.default_rng(1)
    model = conv_model(rng.standard_normal((8, 16, 3, 3)).astype(np.float32), [1, 16, 8, 8])
    _, report = ol.optimize(model, method="monochromatic", colors=4, check=0)
    assert "C <= 4" in report.records[0].reason
    _, report = ol.optimize(model, method="monochromatic", colors=4, check=0, force=True)
    assert report.records[0].status == "rewritten"


def test_max_error_picks_the_fewest_colours_and_speedup_the_most():
    model, _ = _first_layer(n=12, colors=3)
    _, report = ol.optimize(model, method="monochromatic", max_error=0.01, check=0)
    record = report.records[0]
    assert record.status == "rewritten" and record.rank == 3 and record.fit_error < 0.01
    _, report = ol.optimize(model, method="monochromatic", speedup=2, check=0)
    record = report.records[0]
    assert record.macs_before >= 2 * record.macs_after and 12 % record.rank == 0
    more = ol.optimize(model, method="monochromatic", colors=12, check=0, force=True)[1]
    assert record.rank == 12 or 2 * more.records[0].macs_after > record.macs_before


@pytest.mark.parametrize(
    "options, message",
    [
        ({"energy": 0.9}, "--energy has no meaning for monochromatic"),
        ({"rank": 4}, "use --colors"),
        ({"colors": 0}, "--colors must be >= 1"),
    ],
)
def test_bad_options_are_one_clear_error(options, message):
    model, _ = _first_layer()
    with pytest.raises(ol.LowRankError, match=message):
        ol.optimize(model, method="monochromatic", check=0, **options)


def test_config_round_trip():
    config = ol.OptimizeConfig.from_options(method="monochromatic", colors=6)
    assert ol.OptimizeConfig.from_dict(config.to_dict()) == config
    config = ol.OptimizeConfig.from_options(method="bicluster-svd", groups=(2, 4), rank=8)
    assert ol.OptimizeConfig.from_dict(config.to_dict()) == config
