"""Synthetic 24x24 character crops rendered with PIL from the system's fonts.

Each crop shows one of the 36 classes 0-9 A-Z, sometimes with parts of neighbouring characters at
its sides as in a crop from a word, under a random affine distortion (rotation, shear, scale,
aspect), blur, a background with a gradient and low-frequency texture, random contrast and
polarity, and pixel noise. Images are returned in [0, 1], quantized to 8-bit levels as a camera
image would be. Fonts are split by family: the families in TEST_FAMILIES are never used for
training. Development-only: needs pillow, never imported by onnx_lowrank.
"""

from __future__ import annotations

import glob
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SIZE = 24
FONT_DIR = "/usr/share/fonts"
# Symbol, dingbat, keyboard-key and decorative-initial fonts: their "letters" are not letters.
EXCLUDED_FAMILIES = frozenset(
    {
        "D050000L",
        "DejaVu Math TeX Gyre",
        "Linux Biolinum Keyboard O",
        "Linux Libertine Initials O",
        "Standard Symbols PS",
    }
)
# Held-out families for the test set: two serifs, three sans, a mono and a casual face, none a
# metric clone or derivative of a training family.
TEST_FAMILIES = frozenset(
    {
        "Cantarell",
        "Comic Neue",
        "DejaVu Serif",
        "Fira Code",
        "Open Sans",
        "Open Sans Condensed",
        "P052",
        "URW Gothic",
    }
)
_RENDER_PT = 64  # glyphs are drawn at this size, then warped down to the 3x supersampled canvas
_SUPER = 3


@dataclass(frozen=True)
class FontFace:
    """One font file with the metrics the renderer needs."""

    path: str
    family: str
    style: str
    font: ImageFont.FreeTypeFont
    cap_height: float  # height of "H" at _RENDER_PT, the unit for scaling


def _is_usable(font: ImageFont.FreeTypeFont) -> bool:
    """True when all 36 characters draw distinct, non-empty glyphs (no tofu, no symbol font)."""
    seen = set()
    for char in CHARS:
        image = Image.new("L", (96, 96))
        ImageDraw.Draw(image).text((16, 8), char, font=font, fill=255)
        data = image.tobytes()
        if not any(data) or data in seen:
            return False
        seen.add(data)
    return True


def discover_fonts(font_dir: str = FONT_DIR) -> dict[str, list[FontFace]]:
    """Usable fonts under font_dir grouped by family name, families and styles sorted."""
    families: dict[str, list[FontFace]] = defaultdict(list)
    paths = sorted(glob.glob(f"{font_dir}/**/*.ttf", recursive=True))
    paths += sorted(glob.glob(f"{font_dir}/**/*.otf", recursive=True))
    for path in paths:
        try:
            font = ImageFont.truetype(path, _RENDER_PT)
        except OSError:
            continue
        family, style = font.getname()
        if family in EXCLUDED_FAMILIES or not _is_usable(font):
            continue
        left, top, right, bottom = font.getbbox("H", anchor="ls")
        families[family].append(FontFace(path, family, style, font, float(bottom - top)))
    return {name: sorted(faces, key=lambda f: f.path) for name, faces in sorted(families.items())}


def split_fonts(
    families: dict[str, list[FontFace]],
) -> tuple[dict[str, list[FontFace]], dict[str, list[FontFace]]]:
    """(train, test) families: test holds TEST_FAMILIES, train everything else."""
    train = {k: v for k, v in families.items() if k not in TEST_FAMILIES}
    test = {k: v for k, v in families.items() if k in TEST_FAMILIES}
    missing = TEST_FAMILIES - test.keys()
    if missing:
        raise RuntimeError(f"held-out font families not installed: {sorted(missing)}")
    return train, test


def _glyph_strip(face: FontFace, text: str, center_index: int) -> tuple[Image.Image, float, float]:
    """Draw text on a baseline; return the image and the centre character's (x, y) centre."""
    font = face.font
    pad = _RENDER_PT
    width = int(font.getlength(text)) + 2 * pad
    height = 3 * _RENDER_PT
    baseline = 2 * _RENDER_PT
    strip = Image.new("L", (width, height))
    ImageDraw.Draw(strip).text((pad, baseline), text, font=font, fill=255, anchor="ls")
    x0 = pad + font.getlength(text[:center_index])
    left, top, right, bottom = font.getbbox(text[center_index], anchor="ls")
    return strip, x0 + (left + right) / 2, baseline + (top + bottom) / 2


def _warp(strip: Image.Image, cx: float, cy: float, scale: float, rng: np.random.Generator):
    """Affine-map the strip so the centre character lands near the canvas centre, distorted."""
    canvas = SIZE * _SUPER
    angle = np.deg2rad(rng.uniform(-10, 10))
    shear = rng.uniform(-0.3, 0.3)
    aspect = np.exp(rng.uniform(-0.1, 0.1))
    sx, sy = scale * aspect, scale / aspect
    # forward map: source -> canvas is R @ Shear @ diag(sx, sy); PIL wants the inverse
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    forward = rotation @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])
    inverse = np.linalg.inv(forward)
    shift = rng.uniform(-0.1, 0.1, size=2) * canvas
    target = np.array([canvas / 2, canvas / 2]) + shift
    offset = np.array([cx, cy]) - inverse @ target
    coeffs = (*inverse[0], offset[0], *inverse[1], offset[1])
    return strip.transform((canvas, canvas), Image.AFFINE, coeffs, resample=Image.BILINEAR)


def _background(rng: np.random.Generator) -> np.ndarray:
    """A SIZE x SIZE field in [-0.5, 0.5]: linear gradient plus low-frequency texture."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE - 0.5
    field = rng.uniform(-0.3, 0.3) * xx + rng.uniform(-0.3, 0.3) * yy
    coarse = Image.fromarray(rng.uniform(0, 255, size=(4, 4)).astype(np.uint8))
    texture = np.asarray(coarse.resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float64) / 255 - 0.5
    return field + rng.uniform(0, 0.2) * texture


def render(face: FontFace, label: int, rng: np.random.Generator) -> np.ndarray:
    """One SIZE x SIZE float32 crop in [0, 1] showing CHARS[label] in face."""
    left = right = ""
    # parts of the neighbouring characters, as in a crop out of a word
    if rng.random() < 0.2:
        left = CHARS[rng.integers(len(CHARS))] + " " * int(rng.integers(0, 2))
    if rng.random() < 0.2:
        right = " " * int(rng.integers(0, 2)) + CHARS[rng.integers(len(CHARS))]
    text, center = left + CHARS[label] + right, len(left)
    strip, cx, cy = _glyph_strip(face, text, center)
    cap_fraction = rng.uniform(0.55, 0.8)
    warped = _warp(strip, cx, cy, cap_fraction * SIZE * _SUPER / face.cap_height, rng)
    blur = rng.uniform(0, 0.8) if rng.random() < 0.7 else 0.0
    if blur > 0.05:
        warped = warped.filter(ImageFilter.GaussianBlur(blur * _SUPER))
    ink = np.asarray(warped.resize((SIZE, SIZE), Image.BOX), dtype=np.float64) / 255
    contrast = rng.uniform(0.25, 0.9)
    dark_text = rng.random() < 0.5
    level = rng.uniform(contrast, 1.0) if dark_text else rng.uniform(0.0, 1.0 - contrast)
    paper = level + _background(rng) * 0.8 * (1 - contrast)
    ink_level = paper - contrast if dark_text else paper + contrast
    image = paper * (1 - ink) + ink_level * ink
    image += rng.normal(0, rng.uniform(0, 0.06), size=image.shape)
    return (np.round(np.clip(image, 0, 1) * 255) / 255).astype(np.float32)


def render_batch(
    families: dict[str, list[FontFace]], count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """count crops (N x 1 x SIZE x SIZE float32) with int64 labels, a family drawn uniformly."""
    names = list(families)
    labels = rng.integers(len(CHARS), size=count)
    images = np.empty((count, 1, SIZE, SIZE), np.float32)
    for i, label in enumerate(labels):
        faces = families[names[rng.integers(len(names))]]
        images[i, 0] = render(faces[rng.integers(len(faces))], int(label), rng)
    return images, labels.astype(np.int64)
