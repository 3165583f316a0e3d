"""OCR on rendered text and a scanned page: rapidocr's own pipeline (PP-OCR detector and
recogniser from its wheel), calibration inputs in the models' layouts, and the agreement of
two pipelines' lines (exact match rate, character error rate)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONTS = "/usr/share/fonts/truetype"
FACES = [
    "dejavu/DejaVuSans.ttf",
    "dejavu/DejaVuSerif.ttf",
    "liberation2/LiberationSans-Regular.ttf",
    "liberation2/LiberationSerif-Regular.ttf",
    "liberation2/LiberationMono-Regular.ttf",
    "lato/Lato-Regular.ttf",
    "open-sans/OpenSans-Regular.ttf",
    "dejavu/DejaVuSans-Bold.ttf",
]
LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Invoice 2024-0917: total due $1,284.50",
    "Low-rank factorization of convolution kernels",
    "Call +1 (555) 013-4477 before 6:30 pm",
    "Platform 9 departs at 14:05 to Edinburgh",
    "Keep out of reach of children.",
    "SERIAL No. XK-44-1093-B",
    "Mix 250 g flour with 3 eggs and a pinch of salt",
    "https://example.org/docs/install.html",
    "Temperature: 21.5 C, humidity 48%",
    "Chapter 12 - The Return of the Native",
    "Best before 03/2026, lot 77A",
]
# Calibration only: other strings than LINES, so the evaluation text is never fitted on.
CALIBRATION_LINES = [
    "Pack my box with five dozen liquor jugs",
    "Order #55120 shipped via ground, 3 items",
    "Room 204, second floor, east wing",
    "Sphinx of black quartz, judge my vow!",
    "Net weight 500 ml / 16.9 fl oz",
    "Meeting moved to Thursday 10:00 AM",
    "Total: 17 pages, printed 2023-05-02",
    "Do not bend. Handle with care.",
]
MEAN, STD = 0.5, 0.5  # PP-OCR det and rec: (x / 255 - 0.5) / 0.5


def font(index: int, size: int) -> ImageFont.FreeTypeFont:
    """A Debian TTF font, cycling through FACES."""
    return ImageFont.truetype(os.path.join(FONTS, FACES[index % len(FACES)]), size)


def render_page(lines: list[str], first_font: int = 0, size: int = 30) -> np.ndarray:
    """Black text lines on white, one font per line, as an RGB uint8 page."""
    height = (size * 2) * len(lines) + size
    page = Image.new("RGB", (size * 32, height), "white")
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(lines):
        draw.text((size, size // 2 + 2 * size * i), line, font=font(first_font + i, size), fill=0)
    return np.asarray(page)


def documents() -> dict[str, np.ndarray]:
    """The evaluation images: LINES on two rendered pages, and scikit-image's scanned page."""
    import skimage.data

    half = len(LINES) // 2
    page = skimage.data.page()
    return {
        "rendered-1": render_page(LINES[:half], 0),
        "rendered-2": render_page(LINES[half:], half),
        "skimage-page": np.stack([page] * 3, -1),
    }


def _normalise(rgb: np.ndarray) -> np.ndarray:
    return ((rgb.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def det_calibration(count: int = 8, size: int = 320, seed: int = 0) -> np.ndarray:
    """(count, 3, size, size) random crops of pages of CALIBRATION_LINES in other fonts."""
    rng = np.random.default_rng(seed)
    pages = [render_page(CALIBRATION_LINES, k, s) for k, s in ((1, 26), (3, 34))]
    out = []
    for i in range(count):
        page = pages[i % len(pages)]
        top = rng.integers(0, max(page.shape[0] - size, 0) + 1)
        left = rng.integers(0, page.shape[1] - size + 1)
        crop = np.full((size, size, 3), 255, np.uint8)
        piece = page[top : top + size, left : left + size]
        crop[: piece.shape[0], : piece.shape[1]] = piece
        out.append(_normalise(crop))
    return np.stack(out)


def rec_calibration(height: int = 48, width: int = 320) -> np.ndarray:
    """(lines, 3, height, width) CALIBRATION_LINES, one line each, resized and padded the way
    rapidocr feeds its recogniser (zero padding after normalisation)."""
    out = []
    for i, line in enumerate(CALIBRATION_LINES):
        image = Image.fromarray(render_page([line], i + 2, 32)[: 64 + 8])
        box = _ink_box(image)
        image = image.crop(box)
        new_w = min(width, int(np.ceil(height * image.width / image.height)))
        padded = np.zeros((3, height, width), np.float32)
        padded[:, :, :new_w] = _normalise(np.asarray(image.resize((new_w, height))))
        out.append(padded)
    return np.stack(out)


def _ink_box(image: Image.Image) -> tuple[int, int, int, int]:
    """Bounding box of the dark pixels, with a small margin."""
    dark = np.argwhere(np.asarray(image.convert("L")) < 128)
    (top, left), (bottom, right) = dark.min(0), dark.max(0)
    return max(left - 4, 0), max(top - 4, 0), right + 5, bottom + 5


def pipeline(det_path: str, rec_path: str):
    """rapidocr's RapidOCR with the given detector and recogniser files (no angle classifier;
    PaddleOCR's classic resize: longest side at most 960)."""
    from rapidocr import RapidOCR

    return RapidOCR(
        params={
            "Det.model_path": det_path,
            "Rec.model_path": rec_path,
            "Global.use_cls": False,
            "Global.log_level": "error",
            "Det.limit_type": "max",
            "Det.limit_side_len": 960,
        }
    )


def read(engine, image: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """(box as x0, y0, x1, y1; text) per detected line."""
    result = engine(image[..., ::-1].copy())  # rapidocr takes OpenCV's BGR order
    if result.boxes is None:
        return []
    return [
        (np.concatenate([np.min(b, 0), np.max(b, 0)]), text)
        for b, text in zip(result.boxes, result.txts)
    ]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def agreement(reference: list, candidate: list) -> tuple[int, int, int, int]:
    """Pair each reference line with the candidate line whose box overlaps it most; returns
    (exact matches, reference lines, character edits, reference characters)."""
    from .yolo import iou

    exact = edits = chars = 0
    for box, text in reference:
        chars += len(text)
        if not candidate:
            edits += len(text)
            continue
        overlaps = iou(box, np.stack([b for b, _ in candidate]))
        other = candidate[int(overlaps.argmax())][1] if overlaps.max() > 0.3 else ""
        exact += other == text
        edits += edit_distance(text, other)
    return exact, len(reference), edits, chars
