"""The shapes world: one coloured circle, square or triangle on a plain background, with its caption."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sdkit.errors import SdkitError

# --- vocabulary ---------------------------------------------------------------------------------
# What the base model is trained on. Everything in the EXTRA_* / STYLES-beyond-"fill" / rotation
# vocabulary is drawable but never sampled by default: it is kept back for the LoRA, embedding and
# ControlNet lessons, where the model has to learn something it has never seen.

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}

EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {"purple": (128, 0, 128)}
EXTRA_SHAPES: tuple[str, ...] = ("star",)
STYLES: tuple[str, ...] = ("fill", "outline", "stripes")

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "background")
MIN_SIZE, MAX_SIZE = 0.35, 0.80  # shape size as a fraction of the image side
MARGIN = 0.03  # fraction of the image side kept clear around every sampled shape
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges

# --- the caption grammar ------------------------------------------------------------------------
#   caption    := "" | object | object " on a " BACKGROUND " background"
#   object     := "a " [COLOUR " "] noun
#   noun       := SHAPE | "shape"
# A full caption names all three attributes ("a red circle on a white background"). A partial
# caption names one of the 7 proper subsets of {colour, shape, background}, chosen uniformly; the
# empty subset gives the empty caption and {background} alone gives "a shape on a black background".
PARTIAL_SUBSETS: tuple[tuple[str, ...], ...] = (
    (),
    ("colour",),
    ("shape",),
    ("background",),
    ("colour", "shape"),
    ("colour", "background"),
    ("shape", "background"),
)


@dataclass
class ShapeSpec:
    """One image of the world; size, cx and cy are fractions of the image side, rotation in degrees."""

    shape: str
    colour: str
    background: str
    size: float
    cx: float
    cy: float
    rotation: float = 0
    style: str = "fill"

    def attributes(self) -> dict[str, str]:
        """The three captionable attributes: colour, shape and background."""
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (for JSON)."""
        return asdict(self)


def random_spec(rng: np.random.Generator, *, min_size: float = MIN_SIZE, max_size: float = MAX_SIZE) -> ShapeSpec:
    """A random training spec: base vocabulary only, filled, upright, fully inside the image."""
    if not 0 < min_size <= max_size <= 1 - 2 * MARGIN:
        raise SdkitError(f"shape size range {min_size}..{max_size} is not inside 0..{1 - 2 * MARGIN}",
                         fix="pass 0 < min_size <= max_size <= 0.94")
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    size = float(rng.uniform(min_size, max_size))
    lo, hi = size / 2 + MARGIN, 1 - size / 2 - MARGIN
    cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
    return ShapeSpec(shape=shape, colour=colour, background=background, size=size, cx=cx, cy=cy)


# --- drawing ------------------------------------------------------------------------------------


def _check(spec: ShapeSpec, size: int) -> None:
    """Raise SdkitError for a spec or image size that cannot be drawn."""
    checks = [
        ("shape", spec.shape, SHAPES + EXTRA_SHAPES),
        ("colour", spec.colour, tuple(COLOURS) + tuple(EXTRA_COLOURS)),
        ("background", spec.background, tuple(BACKGROUNDS)),
        ("style", spec.style, STYLES),
    ]
    for field, value, allowed in checks:
        if value not in allowed:
            raise SdkitError(f"unknown {field} {value!r}", fix=f"use one of: {', '.join(allowed)}")
    if not isinstance(size, int) or size < 8:
        raise SdkitError(f"image size {size!r} is too small", fix="pass an integer size of 8 or more")


def _polygon(spec: ShapeSpec, scale: float) -> list[tuple[float, float]]:
    """The outline points of a square, triangle or star, rotated about the centre, in pixels."""
    r = spec.size / 2
    if spec.shape == "square":
        points = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif spec.shape == "triangle":  # upright: apex on top, horizontal base, height = base width
        points = [(0.0, -r), (r, r), (-r, r)]
    else:  # star: five points, apex on top
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.4 * r
            angle = math.pi * k / 5
            points.append((radius * math.sin(angle), -radius * math.cos(angle)))
    theta = math.radians(spec.rotation)  # counter-clockwise on screen
    cos, sin = math.cos(theta), math.sin(theta)
    return [((spec.cx + x * cos + y * sin) * scale, (spec.cy - x * sin + y * cos) * scale) for x, y in points]


def mask(spec: ShapeSpec, *, size: int = 64) -> np.ndarray:
    """The shape's coverage of each pixel, 0..255 (uint8, size x size): anti-aliased, style applied."""
    _check(spec, size)
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    pen = ImageDraw.Draw(canvas)
    width = max(SUPERSAMPLE, round(0.12 * spec.size * big)) if spec.style == "outline" else 0
    fill = None if spec.style == "outline" else 255
    outline = 255 if spec.style == "outline" else None
    if spec.shape == "circle":
        r = spec.size / 2 * big
        box = [spec.cx * big - r, spec.cy * big - r, spec.cx * big + r - 1, spec.cy * big + r - 1]
        pen.ellipse(box, fill=fill, outline=outline, width=width)
    else:
        pen.polygon(_polygon(spec, big), fill=fill, outline=outline, width=width)
    if spec.style == "stripes":  # diagonal stripes, 8 light + 8 dark bands across the image
        period = big / 8
        i = np.arange(big)
        stripes = ((i[:, None] + i[None, :]) // (period / 2)) % 2 == 0
        canvas = Image.fromarray(np.where(stripes, np.asarray(canvas), 0).astype(np.uint8))
    return np.asarray(canvas.reduce(SUPERSAMPLE))


def _composite(alpha: np.ndarray, colour: tuple[int, int, int], background: tuple[int, int, int]) -> np.ndarray:
    """Blend a colour over a background by coverage 0..255; works on one mask or a batch of masks."""
    fg = np.asarray(colour, dtype=np.int32)
    bg = np.asarray(background, dtype=np.int32)
    a = alpha.astype(np.int32)[..., None]
    return ((bg * 255 + (fg - bg) * a + 127) // 255).astype(np.uint8)


def _rgb(name: str) -> tuple[int, int, int]:
    """The RGB value of a colour name, base or extra."""
    return COLOURS.get(name) or EXTRA_COLOURS[name]


def draw(spec: ShapeSpec, *, size: int = 64) -> Image.Image:
    """The RGB image of a spec, size x size pixels."""
    alpha = mask(spec, size=size)
    return Image.fromarray(_composite(alpha, _rgb(spec.colour), BACKGROUNDS[spec.background]), mode="RGB")


# --- captions -----------------------------------------------------------------------------------


def _article(word: str) -> str:
    """'an' before a vowel, else 'a'."""
    return "an" if word[:1] in "aeiou" else "a"


def format_caption(*, colour: str | None = None, shape: str | None = None, background: str | None = None) -> str:
    """The caption that asks for exactly the given attributes (all None: the empty caption)."""
    if colour is None and shape is None and background is None:
        return ""
    noun = shape or "shape"
    words = f"{colour} {noun}" if colour else noun
    text = f"{_article(words)} {words}"
    if background:
        text += f" on {_article(background)} {background} background"
    return text


def _attributes(attrs: ShapeSpec | Mapping[str, Any]) -> dict[str, Any]:
    """Colour, shape and background of a spec or a mapping."""
    if isinstance(attrs, ShapeSpec):
        return attrs.attributes()
    return {name: attrs.get(name) for name in ATTRIBUTES}


def caption(attrs: ShapeSpec | Mapping[str, Any], *, rng: np.random.Generator, full_probability: float = 0.7) -> str:
    """A full caption with probability full_probability, else a partial one (see the grammar above)."""
    if not 0 <= full_probability <= 1:
        raise SdkitError(f"full_probability {full_probability} is not a probability", fix="pass a value in 0..1")
    values = _attributes(attrs)
    if rng.random() < full_probability:
        named: tuple[str, ...] = ATTRIBUTES
    else:
        named = PARTIAL_SUBSETS[int(rng.integers(len(PARTIAL_SUBSETS)))]
    return format_caption(**{name: values[name] for name in named})


def full_captions() -> list[str]:
    """The 24 full captions, in a fixed order: background, then shape, then colour."""
    return [
        format_caption(colour=colour, shape=shape, background=background)
        for background in BACKGROUNDS
        for shape in SHAPES
        for colour in COLOURS
    ]


def parse_caption(text: str) -> dict[str, str | None]:
    """Which colour, shape and background a caption asks for; None for each one it does not mention."""
    words = re.findall(r"[a-z]+", text.lower())
    colours = set(COLOURS) | set(EXTRA_COLOURS)
    shapes = set(SHAPES) | set(EXTRA_SHAPES)
    found: dict[str, set[str]] = {name: set() for name in ATTRIBUTES}
    for i, word in enumerate(words):
        after = words[i + 1] if i + 1 < len(words) else ""
        before = words[max(0, i - 2):i]
        if word in BACKGROUNDS and (after == "background" or "on" in before):
            found["background"].add(word)
        elif word in colours:
            found["colour"].add(word)
        elif word in shapes:
            found["shape"].add(word)
    for name, values in found.items():
        if len(values) > 1:
            raise SdkitError(f"caption {text!r} asks for more than one {name}: {', '.join(sorted(values))}",
                             fix=f"name one {name} per caption: the shapes world has one shape per image")
    return {name: next(iter(values), None) for name, values in found.items()}


# --- data sets ----------------------------------------------------------------------------------


def sample(n: int, *, seed: int, size: int = 64,
           full_probability: float = 0.7) -> list[tuple[Image.Image, str, ShapeSpec]]:
    """n seeded training examples (image, caption, spec); the same seed gives the same bytes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        spec = random_spec(rng)
        out.append((draw(spec, size=size), caption(spec, rng=rng, full_probability=full_probability), spec))
    return out


def dataset_arrays(n: int, *, seed: int, size: int = 64, full_probability: float = 0.7) -> tuple[np.ndarray, list[str]]:
    """The same examples as sample(n, seed=...) as one uint8 array (n, size, size, 3) plus the captions."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        spec = random_spec(rng)
        captions.append(caption(spec, rng=rng, full_probability=full_probability))
        images[i] = _composite(mask(spec, size=size), COLOURS[spec.colour], BACKGROUNDS[spec.background])
    return images, captions
