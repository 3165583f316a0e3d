"""Calibration and evaluation inputs: .npz / .npy files or a folder of images, checked against
the model's inputs, in batches; labels when the data has them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from .config import Preprocess
from .errors import LowRankError
from .runtime import input_specs

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)


@dataclass
class Samples:
    """Model inputs by name (first axis: samples) and optional integer labels."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def head(self, count: int) -> Samples:
        """The first `count` samples (and their labels)."""
        labels = None if self.labels is None else self.labels[:count]
        return Samples({k: v[:count] for k, v in self.arrays.items()}, labels)

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of up to `size` samples each, in order."""
        for start in range(0, len(self), size):
            yield {k: v[start : start + size] for k, v in self.arrays.items()}


def fixed_batch(model: onnx.ModelProto, samples: Samples) -> int | None:
    """The batch size the model's inputs fix (exported with batch 1, say), else None."""
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in samples.arrays and dims and dims[0].dim_value > 0:
            return dims[0].dim_value
    return None


def load_samples(
    path: str,
    model: onnx.ModelProto,
    preprocess: Preprocess | None = None,
    limit: int | None = None,
) -> Samples:
    """Read `path` (.npz, .npy or an image folder) as inputs of `model`; one-line errors."""
    if not os.path.exists(path):
        raise LowRankError(f"{path}: no such file or folder")
    specs = input_specs(model)
    if os.path.isdir(path):
        samples = _load_images(path, specs, preprocess or Preprocess())
    elif path.endswith((".npz", ".npy")):
        samples = _load_arrays(path, specs)
    else:
        raise LowRankError(f"{path}: expected an .npz, an .npy or a folder of images")
    if len(samples) == 0:
        raise LowRankError(f"{path}: holds no samples")
    _check_shapes(path, samples, specs)
    if limit is not None and len(samples) > limit:
        samples = Samples(
            {k: v[:limit] for k, v in samples.arrays.items()},
            None if samples.labels is None else samples.labels[:limit],
        )
    return samples


def _load_arrays(path: str, specs) -> Samples:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise LowRankError(f"{path}: not a readable .npy/.npz file ({exc})") from None
    names = [name for name, _, _ in specs]
    if isinstance(data, np.ndarray):
        if len(names) != 1:
            raise LowRankError(
                f"{path}: an .npy holds one array, the model has inputs {', '.join(names)}"
            )
        return Samples({names[0]: data})
    files = set(data.files)
    arrays = {n: data[n] for n in names if n in files}
    if not arrays and len(names) == 1 and "x" in files:
        arrays = {names[0]: data["x"]}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise LowRankError(
            f"{path}: no array for model input(s) {', '.join(missing)} "
            f"(it has {', '.join(sorted(files)) or 'none'}; a one-input model also takes 'x')"
        )
    labels = data["y"] if "y" in files else None
    return Samples(arrays, None if labels is None else np.asarray(labels).reshape(-1))


def _check_shapes(path: str, samples: Samples, specs) -> None:
    counts = {len(a) for a in samples.arrays.values()}
    if len(counts) != 1:
        raise LowRankError(f"{path}: the arrays hold different numbers of samples")
    if samples.labels is not None and len(samples.labels) != len(samples):
        raise LowRankError(f"{path}: {len(samples.labels)} labels for {len(samples)} samples")
    for name, dims, dtype in specs:
        array = samples.arrays[name]
        want = dims[1:]
        if array.ndim != len(dims) or any(
            d is not None and d != a for d, a in zip(want, array.shape[1:])
        ):
            shown = ["?" if d is None else str(d) for d in dims]
            raise LowRankError(
                f"{path}: input {name!r} has shape {list(array.shape)}, the model "
                f"expects [{', '.join(shown)}]"
            )
        samples.arrays[name] = array.astype(dtype, copy=False)


def _load_images(folder: str, specs, pre: Preprocess) -> Samples:
    if len(specs) != 1:
        raise LowRankError(f"{folder}: an image folder feeds one-input models only")
    name, dims, dtype = specs[0]
    files, labels = _image_files(folder)
    if not files:
        raise LowRankError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    layout = pre.layout if pre.layout != "auto" else _guess_layout(dims)
    chans = dims[1] if layout == "nchw" else dims[-1]
    size = pre.size or (tuple(dims[2:4]) if layout == "nchw" else tuple(dims[1:3]))
    if size is None or None in size:
        raise LowRankError(f"{folder}: the model input's size is not fixed; give --size H,W")
    mode = pre.channels if pre.channels != "auto" else ("gray" if chans == 1 else "rgb")
    images = np.stack([_read_image(f, size, mode) for f in files]).astype(np.float64) * pre.scale
    mean = np.asarray(pre.mean, np.float64)
    std = np.asarray(pre.std, np.float64)
    images = (images - mean) / std  # broadcast over the trailing channel axis
    if layout == "nchw":
        images = images.transpose(0, 3, 1, 2)
    return Samples({name: images.astype(dtype)}, labels)


def _image_files(folder: str) -> tuple[list[str], np.ndarray | None]:
    """Images directly in `folder`, or in class subfolders (labels: subfolder index, sorted)."""
    entries = sorted(os.listdir(folder))
    classes = [e for e in entries if os.path.isdir(os.path.join(folder, e))]
    if classes:
        files, labels = [], []
        for index, cls in enumerate(classes):
            for f in sorted(os.listdir(os.path.join(folder, cls))):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(folder, cls, f))
                    labels.append(index)
        return files, np.asarray(labels, np.int64)
    return [os.path.join(folder, f) for f in entries if f.lower().endswith(IMAGE_EXTENSIONS)], None


def _read_image(path: str, size: tuple[int, int], mode: str) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        raise LowRankError("reading images needs pillow: pip install pillow") from None
    try:
        with Image.open(path) as image:
            image = image.convert("L" if mode == "gray" else "RGB").resize(
                (size[1], size[0]), Image.BILINEAR
            )
            array = np.asarray(image, np.float64)
    except OSError as exc:
        raise LowRankError(f"{path}: cannot read the image ({exc})") from None
    if mode == "gray":
        return array[..., None]
    return array[..., ::-1] if mode == "bgr" else array


def _guess_layout(dims: list[int | None]) -> str:
    if len(dims) == 4 and dims[-1] in (1, 3) and dims[1] not in (1, 3):
        return "nhwc"
    return "nchw"
