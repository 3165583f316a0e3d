"""Rank per layer: --rank (clipped), --energy, --max-error, --speedup, rounding, 'no gain'."""

from __future__ import annotations

import numpy as np
import pytest
from modelgen import conv_model

import onnx_lowrank as ol
from onnx_lowrank.decompose.svd import separable_spectrum

RNG = np.random.default_rng(0)
# a kernel with a decaying spectrum, so targets pick different ranks
U, V = RNG.standard_normal((32 * 3, 40)), RNG.standard_normal((40, 48 * 3))
M = (U * 0.8 ** np.arange(40)) @ V
W = M.reshape(32, 3, 48, 3).transpose(2, 0, 1, 3).astype(np.float32)
MODEL = conv_model(W, [1, 32, 20, 20], {"pads": [1, 1, 1, 1]})


def _record(**options):
    _, report = ol.optimize(MODEL, method="separable", check=0, **options)
    return report.records[0]


def test_rank_is_clipped_to_full_and_not_rounded():
    assert _record(rank=5).rank == 5
    assert _record(rank=10_000, force=True).rank == 96


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_energy_keeps_that_fraction(energy):
    s = separable_spectrum(W)[0] ** 2
    record = _record(energy=energy, rank_multiple=1, force=True)
    assert s[: record.rank].sum() >= energy * s.sum() * (1 - 1e-9)
    assert s[: record.rank - 1].sum() < energy * s.sum()


@pytest.mark.parametrize("max_error", [0.05, 0.2, 0.5])
def test_max_error_is_met(max_error):
    record = _record(max_error=max_error, rank_multiple=1, force=True)
    assert record.fit_error <= max_error
    assert _record(max_error=max_error, rank=None, rank_multiple=1, force=True).rank == record.rank


def test_rounding_up_to_multiple_of_8_keeps_the_target():
    plain = _record(energy=0.9, rank_multiple=1)
    rounded = _record(energy=0.9)
    assert rounded.rank % 8 == 0 and plain.rank <= rounded.rank < plain.rank + 8


@pytest.mark.parametrize("speedup", [2.0, 3.0, 5.0])
def test_speedup_budget_is_respected(speedup):
    record = _record(speedup=speedup)
    assert record.macs_after <= record.macs_before / speedup
    assert record.rank % 8 == 0
    bigger = _record(rank=record.rank + 8)
    assert bigger.macs_after > record.macs_before / speedup


def test_no_gain_is_skipped_unless_forced():
    record = _record(rank=90)
    assert record.status == "skipped" and record.reason.startswith("no gain")
    assert _record(rank=90, force=True).status == "rewritten"


def test_tucker2_two_ranks_and_single_rank_sets_both():
    _, report = ol.optimize(MODEL, method="tucker2", ranks=(8, 16), check=0)
    assert report.records[0].rank == [8, 16]
    _, report = ol.optimize(MODEL, method="tucker2", rank=8, check=0)
    assert report.records[0].rank == [8, 8]


@pytest.mark.parametrize(
    "bad",
    [
        {"energy": 1.5},
        {"rank": 0},
        {"method": "magic"},
        {"max_error": -1},
        {"speedup": 0.5},
        {"rank": 2, "energy": 0.9},
    ],
)
def test_bad_options_are_one_sentence_errors(bad):
    with pytest.raises(ol.LowRankError):
        ol.optimize(MODEL, **bad)


def test_config_round_trips_through_json():
    config = ol.OptimizeConfig.from_options(
        method="tucker2", ranks=(4, 8), input_shapes={"x": (1, 32, 20, 20)}
    )
    assert ol.OptimizeConfig.from_dict(config.to_dict()) == config
