"""Test-accuracy drop of fixed charnet plans under each fit (no timing, no planning).

The planner's verdicts mix two things: which plan it picks and how well each layer is fitted.
This holds the plans fixed (the ones the planner picked at 4x-8x in benchmarks/planner.py runs)
and builds each with: weight-only fits; weight-only + bias correction; the data fit (sequential
least-squares refit of each chain's last conv, the default); and the data fit with
`refit_kept=True` (convs kept as they are refitted to the compressed upstream too).
Calibration: 512 crops from the training fonts (seed 2024),
accuracy on samples/charnet/test.npz (unseen fonts).

    OPENBLAS_NUM_THREADS=1 python benchmarks/plan_fits.py        # about 5 minutes
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnx

from onnx_lowrank.config import Calibration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy import RESULTS, ROOT, accuracy, build_choices, calibration_file, model_path  # noqa: E402

C1, C2, C3 = "/conv1/Conv", "/conv2/Conv", "/conv3/Conv"
PLANS = {
    "sep32 + sep80 (~4.5x)": {C2: ("separable", (32,)), C3: ("separable", (80,))},
    "sep16 + sep56 (~5.5x)": {C2: ("separable", (16,)), C3: ("separable", (56,))},
    "tucker2 8x32 + sep56 (~6x)": {C2: ("tucker2", (8, 32)), C3: ("separable", (56,))},
    "tucker2 8x32 + sep40 (~6x)": {C2: ("tucker2", (8, 32)), C3: ("separable", (40,))},
    "cs16 + sep8 + sep56 (~6x)": {
        C1: ("channel-svd", (16,)),
        C2: ("separable", (8,)),
        C3: ("separable", (56,)),
    },
    "sep1 + sep8 + sep8 (~8.5x)": {
        C1: ("separable", (1,)),
        C2: ("separable", (8,)),
        C3: ("separable", (8,)),
    },
}
FITS = {  # label: calibration options (None: no calibration at all)
    "weights": None,
    "weights+bias": {"fit": "weights"},
    "data": {"fit": "data"},
    "data + kept refit": {"fit": "data", "refit_kept": True},
}


def main() -> int:
    model = onnx.load(model_path("charnet"))
    test = np.load(os.path.join(ROOT, "samples", "charnet", "test.npz"))
    name = model.graph.input[0].name
    feeds = [{name: test["x"][i : i + 256]} for i in range(0, len(test["x"]), 256)]
    reference = accuracy(model, feeds, test["y"])
    cal_path = calibration_file("charnet", 512)
    rows = []
    print(f"charnet test accuracy {100 * reference:.2f}%; drop in points per fit")
    print(f"{'plan':<30}" + "".join(f"{f:>22}" for f in FITS))
    for label, choices in PLANS.items():
        row = {"plan": label, "choices": {k: [m, list(r)] for k, (m, r) in choices.items()}}
        for fit, options in FITS.items():
            cal = None if options is None else Calibration(cal_path, size=512, **options)
            built, records = build_choices(model, choices, cal)
            row[fit] = round(100 * (reference - accuracy(built, feeds, test["y"])), 2)
            if fit == "data + kept refit":
                row["kept_refits"] = [r.node for r in records if r.fit and "kept, refit" in r.fit]
        rows.append(row)
        print(f"{label:<30}" + "".join(f"{row[f]:>22.2f}" for f in FITS), flush=True)
    out = os.path.join(RESULTS, "plan_fits.json")
    with open(out, "w") as f:
        json.dump(
            {"reference": reference, "calibration": "512 training-font crops", "rows": rows},
            f,
            indent=1,
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
