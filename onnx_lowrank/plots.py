"""Pictures where they say more than a table: the planner's Pareto chart and the singular-value
spectra of a model's layers. matplotlib is optional (`pip install onnx-lowrank[plot]`)."""

from __future__ import annotations

import numpy as np

from .errors import LowRankError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LowRankError("plots need matplotlib: pip install matplotlib") from None
    return plt


def plan_chart(plan, path: str) -> None:
    """Predicted error along the greedy path against predicted speedup, and every plan that was
    built and timed: measured speedup against its accuracy drop or output error."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    base = plan.baseline_ms
    speedups = [base / p["predicted_ms"] for p in plan.path if p["predicted_ms"] > 0]
    axes[0].plot(speedups, [p["error"] for p in plan.path[: len(speedups)]], ".-")
    axes[0].set(
        xlabel="predicted speedup",
        ylabel="total weight error (root sum of squares)",
        title="greedy path",
    )
    quality = next((k for k in ("drop", "output_error") if plan.trace and k in plan.trace[0]), None)
    for point in plan.trace:
        x = base / point["measured_ms"]
        y = point[quality] if quality else point["error"]
        axes[1].scatter(x, y, color="C1")
        axes[1].scatter(base / point["predicted_ms"], y, color="C0", marker="x")
    axes[1].set(
        xlabel="speedup (o measured, x predicted)",
        ylabel={"drop": "accuracy drop (points)", "output_error": "max rel output error"}.get(
            quality, "total weight error"
        ),
        title="plans built and timed",
    )
    fig.suptitle(
        f"plan for {plan.target.get('kind')} {plan.target.get('value')} on {plan.provider}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def spectra_chart(spectra: dict[str, dict[str, np.ndarray]], path: str) -> None:
    """Normalised singular values per layer, one panel per method."""
    plt = _pyplot()
    methods = sorted({m for per in spectra.values() for m in per})
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for node, per in spectra.items():
            if method in per:
                s = np.asarray(per[method], np.float64)
                ax.semilogy(np.arange(1, len(s) + 1), s / s[0] if s[0] else s, label=node)
        ax.set(title=method, xlabel="index", ylabel="singular value / largest")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
