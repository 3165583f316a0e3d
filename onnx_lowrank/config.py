"""Options of an optimize run as frozen dataclasses; a config round-trips through JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import LowRankError

CLUSTERED = ("monochromatic", "bicluster-svd", "bicluster-outer")  # Denton et al. 2014
CONV_METHODS = ("separable", "channel-svd", "tucker2", "cp", "separable-basis", *CLUSTERED)
METHODS = ("auto",) + CONV_METHODS + ("fc-svd",)
# Methods for which --energy means nothing, and why.
NO_ENERGY = {
    "cp": "a CP decomposition has no singular values",
    "separable-basis": "its basis is a CP fit per input channel, with no singular values",
    "monochromatic": "its size is a number of colours (--colors), not a spectrum",
    "bicluster-svd": "its ranks are per block of a clustering, with no one spectrum",
    "bicluster-outer": "an outer-product (CP) fit has no singular values",
}
DEFAULT_ENERGY = 0.95
RANK_KINDS = ("rank", "energy", "error", "speedup")
PROVIDERS = ("cpu", "cuda")


@dataclass(frozen=True)
class RankSpec:
    """How each layer's rank is chosen: a fixed rank, an energy, a weight error or a MAC cut."""

    kind: str = "energy"
    value: float = 0.95
    second: int | None = None  # second rank of two-rank methods (tucker2 --ranks R1,R2)

    def __post_init__(self) -> None:
        if self.kind not in RANK_KINDS:
            raise LowRankError(f"unknown rank kind {self.kind!r}; expected one of {RANK_KINDS}")
        if self.kind == "rank" and (int(self.value) != self.value or self.value < 1):
            raise LowRankError(f"--rank must be a whole number >= 1, got {self.value:g}")
        if self.second is not None and self.second < 1:
            raise LowRankError(f"--ranks must be whole numbers >= 1, got {self.second}")
        if self.kind == "energy" and not 0.0 < self.value <= 1.0:
            raise LowRankError(f"--energy must be in (0, 1], got {self.value:g}")
        if self.kind == "error" and not 0.0 <= self.value < 1.0:
            raise LowRankError(f"--max-error must be in [0, 1), got {self.value:g}")
        if self.kind == "speedup" and not self.value > 1.0:
            raise LowRankError(f"--speedup must be > 1, got {self.value:g}")

    def describe(self) -> str:
        """A short human label such as 'energy 0.95' or 'rank 32,16'."""
        if self.kind == "rank":
            extra = f",{self.second}" if self.second is not None else ""
            return f"rank {int(self.value)}{extra}"
        return f"{self.kind} {self.value:g}"


@dataclass(frozen=True)
class Preprocess:
    """How image files become a model input: resize, scale, normalise, order and layout."""

    size: tuple[int, int] | None = None  # (height, width); None: the model input's static size
    scale: float = 1.0 / 255.0  # applied to 0-255 pixel values before mean/std
    mean: tuple[float, ...] = (0.0,)  # per channel (one value: all channels)
    std: tuple[float, ...] = (1.0,)
    layout: str = "auto"  # "nchw", "nhwc" (TensorFlow exports), or read off the input's shape
    channels: str = "auto"  # "rgb", "bgr", "gray", or from the input's channel count (1: gray)

    def __post_init__(self) -> None:
        if self.layout not in ("auto", "nchw", "nhwc"):
            raise LowRankError(f"--layout must be nchw or nhwc, got {self.layout!r}")
        if self.channels not in ("auto", "rgb", "bgr", "gray"):
            raise LowRankError(f"--channels must be rgb, bgr or gray, got {self.channels!r}")
        if any(v == 0 for v in self.std):
            raise LowRankError("--std values must be non-zero")


FITS = ("weights", "data")


@dataclass(frozen=True)
class Calibration:
    """Calibration data for data-aware fits: where, how many samples, which fit."""

    path: str
    size: int = 256
    fit: str = "data"  # "data": whitened fit + least-squares refit; "weights": + bias correction
    sequential: bool = True  # fit each layer on inputs from the already compressed upstream
    # data fit: weigh the factorization by the input patches' second moment (Denton eq. 3).
    # Off by default: on both sample models it lowers the calibration error but costs test
    # accuracy against the weight-only factorization + refit (README, "Data-aware fitting").
    whiten: bool = False
    # sequential data fit: a conv left as it is below a compressed one is refitted too (least
    # squares on the inputs the compressed upstream gives it), so it absorbs their error. Off by
    # default: it cost PP-OCR's recogniser most of its text (CER 0.19 -> 0.90 at channel-svd
    # e0.95 with 32 calibration lines) for a small gain on charnet (README).
    refit_kept: bool = False
    preprocess: Preprocess = field(default_factory=Preprocess)
    batch: int = 32

    def __post_init__(self) -> None:
        if self.size < 1:
            raise LowRankError(f"--calibration-size must be >= 1, got {self.size}")
        if self.fit not in FITS:
            raise LowRankError(f"--fit must be weights or data, got {self.fit!r}")


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything `optimize` needs; the CLI flags map one to one onto these fields."""

    method: str = "auto"
    rank: RankSpec | None = None  # None: each method's default (see target())
    rank_multiple: int = 8
    force: bool = False
    fc: bool = True
    input_shapes: dict[str, tuple[int | str, ...]] = field(default_factory=dict)
    check: int = 2
    tolerance: float | None = None
    seed: int = 0
    provider: str = "cpu"
    progress: bool = False
    calibration: Calibration | None = None
    # the planner (--method auto): latency is measured at this batch and thread count
    batch: int = 1
    threads: int | None = None
    data: str | None = None  # --data: evaluation inputs (labels for --max-drop)
    preprocess: Preprocess | None = None  # how --data images become inputs (None: defaults)
    max_drop: float | None = None  # accuracy points the plan may lose (with labelled --data)
    plan_path: str | None = None  # apply this saved plan instead of planning
    colors: int | None = None  # monochromatic: C' colour channels
    groups: tuple[int, int] | None = None  # bicluster-*: (G input, H output) channel clusters

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LowRankError(
                f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        if self.rank_multiple < 1:
            raise LowRankError(f"--rank-multiple must be >= 1, got {self.rank_multiple}")
        if self.check < 0:
            raise LowRankError(f"--check must be >= 0, got {self.check}")
        if self.tolerance is not None and self.tolerance < 0:
            raise LowRankError(f"--tolerance must be >= 0, got {self.tolerance:g}")
        if self.provider not in PROVIDERS:
            raise LowRankError(f"unknown provider {self.provider!r}; choose cpu or cuda")
        if self.batch < 1:
            raise LowRankError(f"--batch must be >= 1, got {self.batch}")
        if self.max_drop is not None and (self.max_drop < 0 or self.data is None):
            raise LowRankError("--max-drop needs labelled --data and a value >= 0")
        if self.method == "auto" and self.rank is not None and self.rank.kind == "rank":
            raise LowRankError(
                "--method auto chooses ranks itself: give --speedup, --energy, --max-error or "
                "--max-drop, or name a --method to use --rank"
            )
        if self.method in NO_ENERGY and self.rank is not None and self.rank.kind == "energy":
            raise LowRankError(
                f"--energy has no meaning for {self.method}: {NO_ENERGY[self.method]}; use "
                f"{'--colors' if self.method == 'monochromatic' else '--rank'}, --max-error or "
                "--speedup"
            )
        self._check_clustered()

    def _check_clustered(self) -> None:
        """--colors and --groups: whole numbers, and only with the methods that use them."""
        if self.colors is not None:
            if self.method != "monochromatic":
                raise LowRankError("--colors applies to --method monochromatic only")
            if self.colors < 1:
                raise LowRankError(f"--colors must be >= 1, got {self.colors}")
            if self.rank is not None:
                raise LowRankError("give --colors or a target (--max-error, --speedup), not both")
        if self.method == "monochromatic" and self.rank is not None and self.rank.kind == "rank":
            raise LowRankError("--rank/--ranks do not apply to monochromatic; use --colors C'")
        if self.groups is not None:
            if not self.method.startswith("bicluster"):
                raise LowRankError("--groups applies to the bicluster-svd/-outer methods only")
            if len(self.groups) != 2 or min(self.groups) < 1:
                raise LowRankError(f"--groups must be two whole numbers >= 1, got {self.groups}")
        if self.method == "bicluster-outer" and self.rank is not None and self.rank.second:
            raise LowRankError("bicluster-outer has one rank: use --rank K, not --ranks")

    def planner_target(self) -> dict[str, Any]:
        """What --method auto aims at: a whole-model speedup, accuracy drop or output error
        (on --data), or a per-layer energy / weight error."""
        if self.max_drop is not None:
            return {"kind": "drop", "value": self.max_drop}
        spec = self.rank or RankSpec("energy", DEFAULT_ENERGY)
        if spec.kind == "error" and self.data is not None:
            return {"kind": "output_error", "value": spec.value}
        return {"kind": spec.kind, "value": spec.value}

    def target(self, method: str) -> RankSpec:
        """The rank target for `method`: the one given, else --energy 0.95, or for CP methods
        the weight error that energy implies (sqrt(1 - 0.95), about 0.22)."""
        if self.rank is not None:
            return self.rank
        if method in NO_ENERGY:
            return RankSpec("error", round((1 - DEFAULT_ENERGY) ** 0.5, 4))
        return RankSpec("energy", DEFAULT_ENERGY)

    @property
    def data_preprocess(self) -> Preprocess | None:
        """How --data images are read: `preprocess`, else the calibration's settings."""
        if self.preprocess is not None:
            return self.preprocess
        return self.calibration.preprocess if self.calibration is not None else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        out = dataclasses.asdict(self)
        out["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizeConfig:
        """Inverse of to_dict; unknown keys are an error so typos do not pass silently."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise LowRankError(f"unknown config keys: {', '.join(sorted(unknown))}")
        data = dict(data)
        if isinstance(data.get("rank"), dict):
            data["rank"] = RankSpec(**data["rank"])
        if isinstance(data.get("calibration"), dict):
            cal = dict(data["calibration"])
            cal["preprocess"] = _preprocess_from_dict(cal.get("preprocess") or {})
            data["calibration"] = Calibration(**cal)
        if isinstance(data.get("preprocess"), dict):
            data["preprocess"] = _preprocess_from_dict(data["preprocess"])
        if "input_shapes" in data:
            data["input_shapes"] = {k: tuple(v) for k, v in data["input_shapes"].items()}
        if data.get("groups") is not None:
            data["groups"] = tuple(data["groups"])
        return cls(**data)

    @classmethod
    def from_options(cls, **options: Any) -> OptimizeConfig:
        """Build from CLI-like keyword options: rank=, ranks=, energy=, max_error=, speedup=."""
        picked = {
            k: options.pop(k)
            for k in ("rank", "ranks", "energy", "max_error", "speedup")
            if options.get(k) is not None
        }
        options = {k: v for k, v in options.items() if v is not None}
        if len(picked) > 1:
            raise LowRankError("give only one of rank, ranks, energy, max_error, speedup")
        if isinstance(picked.get("rank"), RankSpec):
            return cls(rank=picked["rank"], **options)
        if "ranks" in picked:
            first, second = picked["ranks"]
            spec = RankSpec("rank", first, second)
        elif "rank" in picked:
            spec = RankSpec("rank", picked["rank"])
        elif "max_error" in picked:
            spec = RankSpec("error", picked["max_error"])
        elif picked:
            ((kind, value),) = picked.items()
            spec = RankSpec(kind, value)
        else:
            spec = None
        return cls(rank=spec, **options)


def _preprocess_from_dict(values: dict[str, Any]) -> Preprocess:
    values = dict(values)
    for key in ("size", "mean", "std"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    return Preprocess(**values)
