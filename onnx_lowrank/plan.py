"""Choose the method and rank of every layer against a whole-model target, with measured cost.

Each factorable layer gets a list of options: the layer as it is, and every method that applies
at a dozen ranks (those giving 1.4x to 16x fewer multiply-adds, rounded as configured).
Each option carries its error (relative weight error, or with calibration data the relative
output error on input patches sampled from it) and its latency measured in onnxruntime (latency.py).
`allocate` then moves layers to cheaper options greedily, always taking the move with the least
added squared error per millisecond saved, until the predicted model latency meets the budget.
With convex error/latency curves every point of that path is optimal for its own latency.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

MAC_CUTS = (1.4, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 16.0)


@dataclass
class Option:
    """One way to run a layer: `method` None is the layer as it is."""

    method: str | None
    rank: list[int] | None
    macs: int
    error: float
    ms: float
    weight_bytes: int = 0  # its weights' share of the model's footprint (float32)


@dataclass
class LayerPlan:
    """A layer's options (the first is the original) and the one chosen."""

    node: str
    op: str
    options: list[Option]
    choice: int = 0
    # from onnxruntime's profiler inside the whole models (profile.py): original, optimized
    profiled_ms: list[float] | None = None

    @property
    def chosen(self) -> Option:
        return self.options[self.choice]

    @property
    def saved_ms(self) -> float:
        return self.options[0].ms - self.chosen.ms


@dataclass
class Plan:
    """Per-layer choices, the latencies they predict, and what was measured end to end."""

    layers: list[LayerPlan]
    baseline_ms: float
    provider: str = "cpu"
    batch: int = 1
    threads: int | None = None
    target: dict = field(default_factory=dict)
    measured_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    path: list[dict] = field(default_factory=list)  # the greedy path: predicted ms, error
    trace: list[dict] = field(default_factory=list)  # every plan built: predicted vs measured
    profiled_other_ms: list[float] | None = None  # the rest of the graph: original, optimized
    # the prediction made just before the chosen plan was built, corrected by the in-place
    # timings of the plans built before it (None: it was the first one built)
    corrected_ms: float | None = None
    # layers whose choice differs from the measured plan that prediction started from (0: the
    # trial build before the first plan measured this very architecture)
    corrected_changed: int | None = None

    @property
    def predicted_ms(self) -> float:
        return self.baseline_ms - sum(layer.saved_ms for layer in self.layers)

    @property
    def predicted_speedup(self) -> float:
        return self.baseline_ms / self.predicted_ms if self.predicted_ms > 0 else float("inf")

    def choices(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """{node: (method, rank)} for every layer the plan rewrites."""
        return {
            layer.node: (layer.chosen.method, tuple(layer.chosen.rank))
            for layer in self.layers
            if layer.chosen.method is not None
        }

    def total_error(self) -> float:
        return float(np.sqrt(sum(layer.chosen.error**2 for layer in self.layers)))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["predicted_ms"] = self.predicted_ms
        data["predicted_speedup"] = self.predicted_speedup
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        data = {k: v for k, v in data.items() if k not in ("predicted_ms", "predicted_speedup")}
        layers = [
            LayerPlan(
                layer["node"],
                layer["op"],
                [Option(**o) for o in layer["options"]],
                layer["choice"],
                layer.get("profiled_ms"),
            )
            for layer in data.pop("layers")
        ]
        return cls(layers=layers, **data)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> Plan:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


@dataclass
class Step:
    """A point of the greedy path: predicted ms, total squared error, the choice per layer."""

    ms: float
    error2: float
    choices: list[int]


def allocate(
    layers: list[LayerPlan],
    baseline_ms: float,
    budget_ms: float = 0.0,
    start: Step | None = None,
    banned: frozenset = frozenset(),
) -> list[Step]:
    """Greedy path from all-original (or from `start`) towards `budget_ms` (0: as far as the
    options go).

    Each step moves one layer to a faster option, the move with the least added squared error
    per millisecond saved (moves that also cut the error come first); options in `banned`
    ((layer index, option index) pairs) are never moved to. Returns every step, `start` first."""
    choice = list(start.choices) if start else [0] * len(layers)
    ms, error2 = (start.ms, start.error2) if start else (baseline_ms, 0.0)
    path = [Step(ms, error2, list(choice))]
    while ms > budget_ms:
        best = None
        for i, layer in enumerate(layers):
            current = layer.options[choice[i]]
            for j, option in enumerate(layer.options):
                saved = current.ms - option.ms
                if saved <= 1e-9 or (i, j) in banned:
                    continue
                ratio = (option.error**2 - current.error**2) / saved
                if best is None or ratio < best[0]:
                    best = (ratio, i, j, saved, option.error**2 - current.error**2)
        if best is None:
            break
        _, i, j, saved, added = best
        choice[i] = j
        ms, error2 = ms - saved, error2 + added
        path.append(Step(ms, error2, list(choice)))
    return path


def apply_step(layers: list[LayerPlan], step: Step) -> None:
    for layer, choice in zip(layers, step.choices):
        layer.choice = choice


def first_within(path: list[Step], budget_ms: float) -> Step:
    """The first step whose predicted latency is within the budget, else the fastest step."""
    return next((s for s in path if s.ms <= budget_ms), path[-1])


def fastest_within_error(layers: list[LayerPlan], max_error: float) -> None:
    """Per layer, the fastest option whose own error is within `max_error`."""
    for layer in layers:
        fits = [j for j, o in enumerate(layer.options) if o.error <= max_error]
        layer.choice = min(fits, key=lambda j: layer.options[j].ms)
