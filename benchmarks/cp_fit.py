"""CP fit quality and time: our NLS and ALS against tensorly's ``parafac``.

Layers: the 3x3 convs of a VGG-16-shaped model with random Gaussian weights (a representative
subset by default, ``--full`` for all thirteen) and every Conv of the trained sample models
(samples/charnet, samples/digits) when their model.onnx exists. Ranks give 4x and 8x fewer
multiply-adds than the dense layer, with the CP chain costing ``R (C + kH + kW + N)`` per output
pixel against ``N C kH kW``. Random Gaussian kernels are nearly incompressible (errors near 1
at these ranks): they measure speed and optimiser quality on a hard, flat landscape, not what
compression of a trained layer achieves.

Iteration budgets: our NLS runs 10 ALS sweeps from an SVD guess then at most ``--iters`` LM
iterations; our ALS and tensorly's ``parafac`` (``init="svd"``, ``tol`` as ours) run at most
``--iters + 10`` sweeps (tensorly skips the 512x512 rank-256 timing fit unless ``--full``:
it takes about 15 s a sweep there). Timings use ``--threads`` BLAS threads (1 by default: the
machine's two cores are shared). Needs ``pip install tensorly`` (and onnx for the sample models).

    python benchmarks/cp_fit.py [--full] [--iters 50] [--threads 1] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from onnx_lowrank.decompose.cp import cp_als, cp_nls, relative_error

ROOT = Path(__file__).resolve().parents[1]
VGG16 = [  # (name, N, C) of the 3x3 convs
    ("conv1_1", 64, 3), ("conv1_2", 64, 64), ("conv2_1", 128, 64), ("conv2_2", 128, 128),
    ("conv3_1", 256, 128), ("conv3_2", 256, 256), ("conv3_3", 256, 256),
    ("conv4_1", 512, 256), ("conv4_2", 512, 512), ("conv4_3", 512, 512),
    ("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512),
]  # fmt: skip
SUBSET = ("conv1_2", "conv2_2", "conv3_2")
TIMING_LAYER, TIMING_RANK = ("vgg16-like 512x512 (timing)", 512, 512), 256


def cp_rank(shape: tuple[int, ...], reduction: float) -> int:
    """Rank whose CP chain has ``reduction`` times fewer multiply-adds than the dense conv."""
    n, c, kh, kw = shape
    return max(1, int(n * c * kh * kw / reduction // (n + c + kh + kw)))


def vgg_layers(full: bool) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    layers = []
    for name, n, c in VGG16:
        weight = rng.standard_normal((n, c, 3, 3)).astype(np.float32) * np.sqrt(2 / (9 * c))
        if full or name in SUBSET:
            layers.append((f"vgg16/{name}", weight))
    return layers


def sample_layers() -> list[tuple[str, np.ndarray]]:
    layers = []
    for sample in ("charnet", "digits"):
        path = ROOT / "samples" / sample / "model.onnx"
        if not path.exists():
            print(f"skipping {sample}: {path} does not exist yet")
            continue
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for node in model.graph.node:
            weight = weights.get(node.input[1]) if node.op_type == "Conv" else None
            if weight is not None and weight.ndim == 4:
                layers.append((f"{sample}:{node.name or node.output[0]}", weight))
    return layers


def tensorly_fit(weight: np.ndarray, rank: int, iters: int) -> float:
    import tensorly as tl
    from tensorly.decomposition import parafac

    tensor = tl.tensor(weight.astype(np.float64))
    # tensorly warns that its SVD init has fewer vectors than the rank and fills the rest.
    warnings.filterwarnings("ignore", message="Trying to compute SVD", category=UserWarning)
    cp = parafac(tensor, rank, n_iter_max=iters, init="svd", tol=1e-8, random_state=0)
    return relative_error(weight, tl.cp_to_tensor(cp))


def timed(fit):
    """``(result, seconds)`` of one call."""
    start = time.perf_counter()
    result = fit()
    return result, time.perf_counter() - start


def run_layer(name: str, weight: np.ndarray, rank: int, target: str, args) -> dict:
    """Fit one layer at one rank with the three methods; a JSON-ready record."""
    record = {"layer": name, "shape": list(weight.shape), "target": target, "rank": rank}
    nls, record["nls_s"] = timed(lambda: cp_nls(weight, rank, max_iter=args.iters))
    record.update(nls_error=nls.relative_error, nls_degenerate=nls.degenerate)
    als, record["als_s"] = timed(lambda: cp_als(weight, rank, max_iter=args.iters + 10))
    record["als_error"] = als.relative_error
    # tensorly needs ~15 s a sweep on the 512x512 timing kernel here: only with --full.
    if not args.no_tensorly and (target != "-" or args.full):
        error, seconds = timed(lambda: tensorly_fit(weight, rank, args.iters + 10))
        record.update(tensorly_error=error, tensorly_s=seconds)
    return record


def print_row(record: dict) -> None:
    """One table line; '-' where tensorly was not run."""
    tensorly = (
        f"{record['tensorly_error']:9.5f} {record['tensorly_s']:8.1f}"
        if "tensorly_error" in record
        else f"{'-':>9} {'-':>8}"
    )
    flag = " degenerate" if record["nls_degenerate"] else ""
    print(
        f"{record['layer']:28} {'x'.join(map(str, record['shape'])):>14} {record['target']:>6} "
        f"{record['rank']:5d} {record['nls_error']:9.5f} {record['nls_s']:8.1f} "
        f"{record['als_error']:9.5f} {record['als_s']:8.1f} {tensorly}{flag}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="all thirteen VGG-16 3x3 layers")
    parser.add_argument("--iters", type=int, default=50, help="LM iterations (ALS: +10)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads")
    parser.add_argument("--no-tensorly", action="store_true", help="skip tensorly's parafac")
    parser.add_argument("--only", default="", help="run layers whose name contains this")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cp_fit.json"))
    args = parser.parse_args()
    jobs = [
        (name, weight, cp_rank(weight.shape, reduction), f"{reduction}x")
        for name, weight in vgg_layers(args.full) + sample_layers()
        for reduction in (4, 8)
        if args.only in name
    ]
    timing_weight = np.random.default_rng(1).standard_normal(TIMING_LAYER[1:] + (3, 3))
    if args.only in TIMING_LAYER[0]:
        jobs.append((TIMING_LAYER[0], timing_weight.astype(np.float32), TIMING_RANK, "-"))
    print(
        f"{'layer':28} {'shape':>14} {'MACs':>6} {'rank':>5} {'nls err':>9} {'nls s':>8} "
        f"{'als err':>9} {'als s':>8} {'tl err':>9} {'tl s':>8}"
    )
    records: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {"iters": args.iters, "threads": args.threads, "full": args.full, "only": args.only}
    with threadpool_limits(limits=args.threads, user_api="blas"):
        for name, weight, rank, target in jobs:
            records.append(run_layer(name, weight, rank, target, args))
            print_row(records[-1])
            # Written after every layer so an interrupted run keeps what it measured.
            out.write_text(json.dumps({"config": config, "records": records}, indent=2) + "\n")
    wins = [r["nls_error"] < r["tensorly_error"] for r in records if "tensorly_error" in r]
    print(f"NLS below tensorly on {sum(wins)}/{len(wins)} fits; wrote {out}")


if __name__ == "__main__":
    main()
