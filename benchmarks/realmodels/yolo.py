"""YOLOv8 detection on real photos: letterbox pre-processing, decoding with class-wise NMS, and
greedy matching of two models' detections (precision/recall of B's against A's)."""

from __future__ import annotations

import numpy as np
from PIL import Image

SIZE = 320
CONFIDENCE = 0.25
NMS_IOU = 0.45


def photos() -> dict[str, np.ndarray]:
    """Real photos shipped by scikit-image and matplotlib, as RGB uint8 arrays."""
    import matplotlib.cbook
    import skimage.data

    images = {
        name: getattr(skimage.data, name)()
        for name in ("astronaut", "camera", "chelsea", "coffee", "rocket", "immunohistochemistry")
    }
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        images["grace_hopper"] = np.asarray(Image.open(handle).convert("RGB"))
    return {k: np.stack([v] * 3, -1) if v.ndim == 2 else v[..., :3] for k, v in images.items()}


def letterbox(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Resize keeping the aspect ratio, pad to size x size with grey 114: (1, 3, size, size)
    float32 RGB in [0, 1], as Ultralytics feeds its exports."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = round(width * scale), round(height * scale)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    canvas = np.full((size, size, 3), 114, np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return (canvas.transpose(2, 0, 1)[None] / 255.0).astype(np.float32)


def augmentations(images: list[np.ndarray], count: int, seed: int = 0) -> np.ndarray:
    """Calibration inputs: random crops (30-100% of each side), mirror flips and brightness
    changes of `images`, letterboxed; never one of the unchanged evaluation inputs."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        image = images[i % len(images)]
        height, width = image.shape[:2]
        crop_h, crop_w = (int(d * rng.uniform(0.3, 0.95)) for d in (height, width))
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        crop = image[top : top + crop_h, left : left + crop_w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.clip(crop * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8)
        out.append(letterbox(np.ascontiguousarray(crop))[0])
    return np.stack(out)


def decode(output: np.ndarray) -> list[tuple[int, float, np.ndarray]]:
    """(1, 4 + classes, anchors) -> [(class, score, xyxy box)] after the confidence threshold
    and class-wise NMS, best first."""
    rows = output[0].T  # (anchors, 4 + classes): cx, cy, w, h, class scores
    classes, scores = rows[:, 4:].argmax(1), rows[:, 4:].max(1)
    keep = scores >= CONFIDENCE
    boxes = _xyxy(rows[keep, :4])
    classes, scores = classes[keep], scores[keep]
    detections = []
    for cls in np.unique(classes):
        idx = np.flatnonzero(classes == cls)
        for i in _nms(boxes[idx], scores[idx]):
            detections.append((int(cls), float(scores[idx[i]]), boxes[idx[i]]))
    return sorted(detections, key=lambda d: -d[1])


def _xyxy(cxcywh: np.ndarray) -> np.ndarray:
    half = cxcywh[:, 2:] / 2
    return np.concatenate([cxcywh[:, :2] - half, cxcywh[:, :2] + half], axis=1)


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one xyxy box with each of `boxes`."""
    low, high = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / np.maximum(area + areas - inter, 1e-9)


def _nms(boxes: np.ndarray, scores: np.ndarray) -> list[int]:
    order, kept = list(np.argsort(-scores)), []
    while order:
        best = order.pop(0)
        kept.append(best)
        if order:
            overlaps = iou(boxes[best], boxes[order])
            order = [o for o, v in zip(order, overlaps) if v < NMS_IOU]
    return kept


def match(reference: list, candidate: list, min_iou: float = 0.5, max_score_diff: float = 0.05):
    """Greedy matching, best reference detection first: same class, score within
    `max_score_diff`, IoU >= `min_iou`. Returns (matched, len(reference), len(candidate))."""
    free = list(range(len(candidate)))
    matched = 0
    for cls, score, box in reference:
        options = [
            j
            for j in free
            if candidate[j][0] == cls and abs(candidate[j][1] - score) <= max_score_diff
        ]
        if not options:
            continue
        overlaps = iou(box, np.stack([candidate[j][2] for j in options]))
        if overlaps.max() >= min_iou:
            free.remove(options[int(overlaps.argmax())])
            matched += 1
    return matched, len(reference), len(candidate)
