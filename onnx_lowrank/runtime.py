"""onnxruntime sessions for a ModelProto and model inputs: random (seeded) or from a file."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

from .errors import LowRankError
from .graph import PROTOBUF_LIMIT, real_inputs

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
UNKNOWN_DIM = 64  # size used for a free non-batch dim of a random input


def providers_for(provider: str) -> list[str]:
    """The onnxruntime provider list for 'cpu' or 'cuda'; a clear error when CUDA is missing."""
    name = PROVIDER_NAMES.get(provider)
    if name is None:
        raise LowRankError(f"unknown provider {provider!r}; choose cpu or cuda")
    available = ort.get_available_providers()
    if name not in available:
        raise LowRankError(
            f"the {provider.upper()} execution provider is not available in this onnxruntime "
            f"(it has {', '.join(available)}); install onnxruntime-gpu in place of onnxruntime"
        )
    return [name] if provider == "cpu" else [name, "CPUExecutionProvider"]


def session(
    model: onnx.ModelProto,
    provider: str = "cpu",
    optimize: bool = True,
    threads: int | None = None,
    profile_prefix: str | None = None,
) -> ort.InferenceSession:
    """An inference session; models past protobuf's limit go through a temporary file.
    With `profile_prefix`, onnxruntime's profiler writes its JSON there (profile.py)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = providers_for(provider)
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="model.data")
            return ort.InferenceSession(path, options, providers=providers)
    except (ort.capi.onnxruntime_pybind11_state.Fail, RuntimeError) as exc:
        raise LowRankError(
            f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}"
        ) from None


def input_specs(model: onnx.ModelProto) -> list[tuple[str, list[int | None], np.dtype]]:
    """(name, dims with None for free ones, numpy dtype) of each real graph input."""
    names = set(real_inputs(model))
    specs = []
    for vi in model.graph.input:
        if vi.name not in names:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        specs.append((vi.name, dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)))
    return specs


def random_inputs(
    model: onnx.ModelProto, count: int, seed: int = 0, batch: int | None = None
) -> list[dict]:
    """`count` seeded random feeds; a free first dim is `batch` (default 1), others 64."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for name, dims, dtype in input_specs(model):
            shape = [
                d if d is not None else ((batch or 1) if i == 0 else UNKNOWN_DIM)
                for i, d in enumerate(dims)
            ]
            if batch is not None and shape:
                shape[0] = batch
            feed[name] = _random_array(rng, shape, dtype)
        feeds.append(feed)
    return feeds


def _random_array(rng: np.random.Generator, shape: list[int], dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 10, shape).astype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    raise LowRankError(f"cannot make random inputs of type {dtype}; pass --data")
