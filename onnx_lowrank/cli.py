"""`onnx-lowrank optimize|inspect|compare|bench`: parse arguments, call the API, print tables.

Exit codes: 0 done; 1 the check failed its --tolerance (the output is still written); 2 bad
input or usage (one line on stderr, nothing written)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from rich.console import Console

from . import __version__
from .config import METHODS, Calibration, OptimizeConfig, Preprocess
from .errors import LowRankError
from .graph import parse_input_shapes

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2
EPILOG = """examples:
  onnx-lowrank optimize model.onnx model.lowrank.onnx --method separable --energy 0.95
  onnx-lowrank optimize model.onnx out.onnx --method tucker2 --speedup 3 --report out.json
  onnx-lowrank inspect model.onnx
  onnx-lowrank compare model.onnx out.onnx --data test.npz
  onnx-lowrank bench model.onnx out.onnx --runs 50
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-lowrank",
        description="Rewrite the convolutions and fully "
        "connected layers of an ONNX model into faster low-rank op chains.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_optimize(
        sub.add_parser(
            "optimize",
            help="factor the model's layers and write a new model",
            description="Factor each Conv (and Gemm/MatMul) into a low-rank chain.",
        )
    )
    p = sub.add_parser("inspect", help="per-layer shapes, MACs and the ranks energy targets need")
    p.add_argument("model")
    _add_common(p, check=False)
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw each layer's singular-value spectra")
    p = sub.add_parser("compare", help="output error, top-1 agreement and accuracy of two models")
    p.add_argument("reference")
    p.add_argument("candidate")
    p.add_argument(
        "--data",
        metavar="PATH",
        help=".npz (inputs by name or 'x', labels 'y'), .npy, or a folder of images (class "
        "subfolders give labels)",
    )
    _add_common(p)
    _add_preprocess(p)
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p = sub.add_parser("bench", help="median latency in onnxruntime (and the speedup of B over A)")
    p.add_argument("models", nargs="+", metavar="MODEL", help="one or two models")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--batch", type=int, help="batch size of the random inputs (default 1)")
    _add_common(p, check=False)
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    return parser


def _add_common(p: argparse.ArgumentParser, check: bool = True) -> None:
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME:D1,D2,...",
        help="pin an input's dims, e.g. x:1,3,224,224 (N or ? keeps one free); repeatable",
    )
    p.add_argument(
        "--provider",
        choices=("cpu", "cuda"),
        default="cpu",
        help="onnxruntime execution provider (cuda needs onnxruntime-gpu)",
    )
    if check:
        p.add_argument(
            "--check",
            type=int,
            default=2,
            metavar="N",
            help="random inputs for the output check (default 2; 0 skips it); real inputs "
            "replace them when given (--data; optimize: also --calibration, the first 64)",
        )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for random inputs and fits (default 0)"
    )
    p.add_argument(
        "-v", "--verbose", action="count", default=0, help="more output (-vv: debug log)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")


def _add_optimize(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="the ONNX model to optimize")
    p.add_argument("output", help="where to write the optimized model")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="auto",
        help="factorization for convs; auto (default) plans every layer's method and rank with "
        "latency measured in onnxruntime; fc-svd alone factors only Gemm/MatMul",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--rank", type=int, help="the same rank for every layer (clipped to full; needs a --method)"
    )
    target.add_argument(
        "--ranks", metavar="R1,R2", help="input and output ranks of tucker2 and bicluster-svd"
    )
    target.add_argument(
        "--energy",
        type=float,
        help="keep this fraction of the squared singular values, in (0, 1] (default 0.95; cp, "
        "separable-basis and the clustered methods have no spectrum and refuse it)",
    )
    target.add_argument(
        "--max-error",
        type=float,
        metavar="X",
        help="relative Frobenius error of each layer's weight at most X (auto with --data: the "
        "whole model's max relative output error on that data)",
    )
    target.add_argument(
        "--speedup",
        type=float,
        metavar="S",
        help="auto: the whole model S times faster in measured latency; a named method: per "
        "layer, the largest rank whose MACs are at most 1/S of the layer's",
    )
    p.add_argument(
        "--rank-multiple",
        type=int,
        default=8,
        metavar="M",
        help="round ranks to a "
        "multiple of M when that keeps the target (default 8; 1 turns it off)",
    )
    p.add_argument(
        "--colors",
        type=int,
        metavar="C'",
        help="monochromatic: colour channels (the nearest divisor of N when C' does not divide it)",
    )
    p.add_argument(
        "--groups",
        metavar="G,H",
        help="bicluster-svd/-outer: input and output channel clusters (default: with --speedup "
        "or --max-error the best of a small grid, else 2,2)",
    )
    p.add_argument(
        "--force", action="store_true", help="rewrite layers even when the chain costs more"
    )
    p.add_argument("--no-fc", action="store_true", help="leave Gemm/MatMul layers alone")
    p.add_argument(
        "--tolerance",
        type=float,
        metavar="T",
        help="exit 1 when the check's max relative output error exceeds T",
    )
    p.add_argument("--report", metavar="FILE", help="write the per-layer report as JSON")
    p.add_argument(
        "--external-data",
        action="store_true",
        help="write the weights to OUTPUT.data (automatic past 2 GB or when the input did)",
    )
    _add_common(p)
    auto = p.add_argument_group("planner (--method auto)")
    auto.add_argument(
        "--data",
        metavar="PATH",
        help="evaluation inputs (.npz with labels 'y' for --max-drop; --max-error then means "
        "the whole model's output error on them)",
    )
    auto.add_argument(
        "--max-drop", type=float, metavar="D", help="fastest plan losing at most D accuracy points"
    )
    auto.add_argument("--batch", type=int, default=1, help="batch size latency is planned for")
    auto.add_argument("--threads", type=int, help="intra-op threads latency is planned for")
    auto.add_argument(
        "--plan-only", action="store_true", help="write the plan (JSON) to OUTPUT, not a model"
    )
    auto.add_argument("--plan", metavar="FILE", help="apply a saved plan instead of planning")
    auto.add_argument(
        "--plot", metavar="PNG", help="the planner's Pareto chart (error vs measured speedup)"
    )
    data = p.add_argument_group("calibration (data-aware fits)")
    data.add_argument(
        "--calibration",
        metavar="PATH",
        help="unlabelled inputs: .npz (arrays by input name), .npy, or a folder of images",
    )
    data.add_argument(
        "--calibration-size", type=int, default=256, metavar="N", help="samples used (default 256)"
    )
    data.add_argument(
        "--fit",
        choices=("weights", "data"),
        default="data",
        help="data (default): least-squares refit of each chain's last conv (and --whiten); "
        "weights: weight-only fit + bias correction",
    )
    data.add_argument(
        "--whiten",
        action="store_true",
        help="data fit: factor in the input data's metric (Denton eq. 3) before the "
        "least-squares refit; off by default: lower calibration error, but it cost test "
        "accuracy on both sample models (README)",
    )
    data.add_argument(
        "--no-sequential",
        action="store_true",
        help="fit every layer on the original model's inputs, not on the compressed upstream's",
    )
    data.add_argument(
        "--refit-kept",
        action="store_true",
        help="data fit: also refit each conv left as it is below a factored one, to the inputs "
        "the compressed upstream gives it (off by default: it overfitted PP-OCR's classifier)",
    )
    _add_preprocess(p)


def _add_preprocess(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image folders (--calibration / --data)")
    g.add_argument("--size", metavar="H,W", help="resize to H,W (default: the input's size)")
    g.add_argument("--scale", type=float, default=1 / 255, help="pixel scale (default 1/255)")
    g.add_argument("--mean", metavar="M[,M,M]", help="subtracted after scaling (default 0)")
    g.add_argument("--std", metavar="S[,S,S]", help="divided by after the mean (default 1)")
    g.add_argument("--layout", choices=("auto", "nchw", "nhwc"), default="auto")
    g.add_argument("--channels", choices=("auto", "rgb", "bgr", "gray"), default="auto")


def _preprocess(args) -> Preprocess:
    def floats(text, name):
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise LowRankError(f"--{name} {text!r}: expected numbers separated by commas") from None

    size = None
    if args.size:
        size = floats(args.size, "size")
        if len(size) != 2 or min(size) < 1:
            raise LowRankError(f"--size {args.size!r}: expected H,W")
        size = (int(size[0]), int(size[1]))
    return Preprocess(
        size=size,
        scale=args.scale,
        mean=floats(args.mean, "mean") if args.mean else (0.0,),
        std=floats(args.std, "std") if args.std else (1.0,),
        layout=args.layout,
        channels=args.channels,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=(
            logging.DEBUG
            if args.verbose > 1
            else logging.INFO
            if args.verbose
            else logging.ERROR
            if args.quiet
            else logging.WARNING
        ),
        format="%(levelname)s: %(message)s",
    )
    console = Console(quiet=args.quiet, width=None if sys.stdout.isatty() else 160)
    try:
        return COMMANDS[args.command](args, console)
    except LowRankError as exc:
        print(f"onnx-lowrank: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("onnx-lowrank: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line, the traceback only when asked for
        if args.verbose:
            raise
        print(
            f"onnx-lowrank: internal error: {type(exc).__name__}: {exc} (rerun with -v for the "
            "traceback)",
            file=sys.stderr,
        )
        return 3


def _optimize(args, console: Console) -> int:
    from .api import optimize

    _check_paths(args.input, args.output)
    ranks = _parse_ranks(args.ranks) if args.ranks else None
    config = OptimizeConfig.from_options(
        method=args.method,
        rank=args.rank,
        ranks=ranks,
        energy=args.energy,
        max_error=args.max_error,
        speedup=args.speedup,
        rank_multiple=args.rank_multiple,
        force=args.force,
        fc=not args.no_fc,
        input_shapes=parse_input_shapes(args.input_shape),
        check=args.check,
        tolerance=args.tolerance,
        seed=args.seed,
        provider=args.provider,
        progress=not args.quiet and sys.stderr.isatty(),
        calibration=_calibration(args),
        colors=args.colors,
        groups=_parse_ranks(args.groups, "--groups") if args.groups else None,
        batch=args.batch,
        threads=args.threads,
        data=args.data,
        preprocess=_preprocess(args),
        max_drop=args.max_drop,
        plan_path=args.plan,
    )
    if args.plan_only and config.method != "auto":
        raise LowRankError("--plan-only needs --method auto")
    output = None if args.plan_only else args.output
    _, report = optimize(args.input, config, output=output, external_data=args.external_data)
    report.render(console, verbose=args.verbose > 0)
    if args.report:
        report.to_json(args.report)
    if args.plot and report.plan is not None:
        from .plots import plan_chart

        plan_chart(report.plan, args.plot)
    if args.plan_only:
        report.plan.save(args.output)
        console.print(f"wrote the plan to {args.output}")
    else:
        console.print(
            f"wrote {args.output}: {len(report.rewritten)} layer(s) rewritten, "
            f"{len(report.skipped)} skipped"
        )
    unmet = [n for n in (report.plan.notes if report.plan else []) if "not met" in n]
    if unmet:
        print(f"onnx-lowrank: {unmet[0]} (the model was written)", file=sys.stderr)
        return EXIT_CHECK_FAILED
    if report.validation and report.validation.get("passed") is False:
        print(
            f"onnx-lowrank: check failed: max relative output error "
            f"{report.validation['max_rel_error']:.3g} > tolerance {args.tolerance:g} "
            f"(the model was written)",
            file=sys.stderr,
        )
        return EXIT_CHECK_FAILED
    return EXIT_OK


def _calibration(args) -> Calibration | None:
    if not args.calibration:
        return None
    return Calibration(
        args.calibration,
        size=args.calibration_size,
        fit=args.fit,
        sequential=not args.no_sequential,
        refit_kept=args.refit_kept,
        whiten=args.whiten,
        preprocess=_preprocess(args),
    )


def _check_paths(src: str, dst: str) -> None:
    if not os.path.exists(src):
        raise LowRankError(f"{src}: no such file")
    if (
        os.path.exists(dst)
        and os.path.samefile(src, dst)
        or os.path.abspath(src) == os.path.abspath(dst)
    ):
        raise LowRankError("the output path is the input file; choose another output path")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise LowRankError(f"{dst}: output folder {folder} does not exist")
    if os.path.isdir(dst):
        raise LowRankError(f"{dst}: is a directory; give a file name")


def _parse_ranks(text: str, flag: str = "--ranks") -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise LowRankError(f"{flag} {text!r}: expected two whole numbers >= 1, like 32,64")
    return int(parts[0]), int(parts[1])


def _inspect(args, console: Console) -> int:
    from .api import inspect
    from .report import inspect_table

    rows = inspect(args.model, parse_input_shapes(args.input_shape), spectra=bool(args.plot))
    console.print(inspect_table(rows))
    if args.plot:
        from .plots import spectra_chart

        spectra_chart({r["node"]: r["spectra"] for r in rows if r.get("spectra")}, args.plot)
        console.print(f"wrote {args.plot}")
    _write_json(args.json, rows)
    return EXIT_OK


def _compare(args, console: Console) -> int:
    from .calibrate import load_samples
    from .graph import load_model, pin_input_shapes
    from .runtime import random_inputs
    from .validate import compare

    a, b = load_model(args.reference).model, load_model(args.candidate).model
    for m in (a, b):
        pin_input_shapes(m, parse_input_shapes(args.input_shape))
    if args.data:
        samples = load_samples(args.data, a, _preprocess(args))
        feeds, labels = list(samples.batches(64)), samples.labels
    else:
        feeds, labels = random_inputs(a, args.check, seed=args.seed), None
    result = compare(a, b, feeds, labels, provider=args.provider)
    from .report import compare_table

    console.print(compare_table(result, args.reference, args.candidate))
    _write_json(args.json, result)
    return EXIT_OK


def _bench(args, console: Console) -> int:
    from .bench import bench
    from .graph import load_model, pin_input_shapes
    from .report import bench_table

    if len(args.models) > 2:
        raise LowRankError("bench takes one or two models")
    if args.runs < 1 or args.warmup < 0:
        raise LowRankError("--runs must be >= 1 and --warmup >= 0")
    models = [load_model(p).model for p in args.models]
    for m in models:
        pin_input_shapes(m, parse_input_shapes(args.input_shape))
    result = bench(
        models, args.provider, args.runs, args.warmup, args.threads, args.batch, args.seed
    )
    result["models"] = args.models
    console.print(bench_table(result))
    _write_json(args.json, result)
    return EXIT_OK


def _write_json(path: str | None, data) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")


COMMANDS = {"optimize": _optimize, "inspect": _inspect, "compare": _compare, "bench": _bench}

if __name__ == "__main__":
    sys.exit(main())
