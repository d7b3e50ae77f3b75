"""A classical detector for the shapes world: which shape, colour and background an image shows."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from sdkit.errors import SdkitError
from sdkit.shapes.data import ATTRIBUTES, BACKGROUNDS, COLOURS, EXTRA_COLOURS, SHAPES, ShapeSpec

UNKNOWN = "unknown"
MIN_CONTRAST = 80.0  # RGB distance (0..441) from the background below which nothing counts as a shape
MIN_CHROMA = 30.0  # max - min channel of the shape's colour below which it is grey, not a colour
PROFILE_WEIGHT = 0.25  # share of the shape score from the width profile (the rest is template IoU)
SOLID = 0.8  # share of the shape's area that is coloured, above which it is filled
HOLLOW = 0.25  # share of the shape's inner half that is coloured, below which it is an outline (else a pattern)
ALL_COLOURS = {**COLOURS, **EXTRA_COLOURS}  # the palette to judge with when the model may draw the extra colours


@dataclass(frozen=True)
class Detection:
    """What the detector saw: the labels ('unknown' where there is no shape) and the evidence."""

    shape: str
    colour: str
    background: str
    shape_scores: dict[str, float] = field(default_factory=dict)
    colour_scores: dict[str, float] = field(default_factory=dict)
    background_scores: dict[str, float] = field(default_factory=dict)
    foreground_rgb: tuple[float, float, float] | None = None
    area: float = 0.0  # foreground pixels / image pixels
    fill_ratio: float = 0.0  # foreground pixels / bounding-box pixels: square 1, circle 0.79, triangle 0.5
    widening: float = 0.0  # slope of row width against height, both 0..1: triangle 1, circle and square 0
    solidity: float = 0.0  # coloured share of the area the shape's convex hull encloses: filled ~1, outline ~0.5
    style: str = UNKNOWN  # fill, outline (coloured rim, empty middle) or pattern (stripes and the like)

    @property
    def confidence(self) -> dict[str, float]:
        """The score of each chosen label, 0..1 (0 for 'unknown')."""
        chosen = {"shape": self.shape_scores, "colour": self.colour_scores, "background": self.background_scores}
        return {name: scores.get(getattr(self, name), 0.0) for name, scores in chosen.items()}


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An image as float32 RGB, height x width x 3, values 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or min(arr.shape[:2]) < 8:
        raise SdkitError(f"cannot read an image from an array of shape {arr.shape}",
                         fix="pass a PIL image or an RGB array of shape (height, width, 3), at least 8x8")
    out = arr[..., :3].astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating) and out.max(initial=0) <= 1.0:
        out *= 255.0
    return out


def _background(img: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """The median colour of the image border and how close it is to white and to black."""
    b = max(1, round(min(img.shape[:2]) / 32))
    border = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3),
                             img[:, :b].reshape(-1, 3), img[:, -b:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    scale = 255.0 * np.sqrt(3.0)
    scores = {name: float(max(0.0, 1 - np.linalg.norm(bg - rgb) / scale)) for name, rgb in BACKGROUNDS.items()}
    return bg, scores


def _pure(rgb: np.ndarray) -> np.ndarray:
    """A colour's hue at full strength: its grey part dropped, its largest channel scaled to 255."""
    chroma = np.asarray(rgb, dtype=np.float64) - np.min(rgb)
    return chroma * (255.0 / max(float(chroma.max()), 1e-6))


def _colour_scores(rgb: np.ndarray, palette: Mapping[str, tuple[int, int, int]] = COLOURS) -> dict[str, float]:
    """How close a colour's hue is to each colour of the palette, both at full strength, compared in RGB."""
    pure = _pure(rgb)
    return {name: float(max(0.0, 1 - np.linalg.norm(pure - _pure(ref)) / 255.0)) for name, ref in palette.items()}


def _hull(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a mask, filled: the area a shape encloses even where its outline has a gap."""
    from PIL import ImageDraw
    from scipy.spatial import ConvexHull, QhullError

    ys, xs = np.nonzero(mask)
    centres = np.stack([xs, ys], axis=1)
    try:
        hull = ConvexHull(centres)
    except (QhullError, ValueError):  # a line or a point: nothing enclosed
        return mask
    canvas = Image.new("L", (mask.shape[1], mask.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([tuple(map(int, centres[i])) for i in hull.vertices], fill=1)
    return np.asarray(canvas, dtype=bool) | mask


def _style(solid: np.ndarray) -> tuple[str, float]:
    """Whether the largest coloured blob is filled, an outline or a pattern, and its solidity (coloured share of the
    area its convex hull encloses)."""
    from scipy import ndimage

    labels, count = ndimage.label(solid, structure=np.ones((3, 3), dtype=bool))
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        solid = labels == int(np.argmax(sizes))
    area = _hull(solid)
    solidity = float(solid.sum() / max(1, area.sum()))
    if solidity >= SOLID:
        return "fill", solidity
    rows, cols = np.flatnonzero(area.any(axis=1)), np.flatnonzero(area.any(axis=0))
    depth = max(1, round(0.25 * min(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)))
    inner = ndimage.binary_erosion(area, iterations=depth)
    middle = float(solid[inner].mean()) if inner.any() else 0.0
    return ("outline" if middle < HOLLOW else "pattern"), solidity


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected blob of a mask, holes filled."""
    from scipy import ndimage  # imported here: data-only users of sdkit.shapes never pay for scipy

    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def _shape_scores(mask: np.ndarray) -> tuple[dict[str, float], float, float]:
    """Shape scores (template IoU mixed with the width profile), fill ratio and widening of a mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = box.shape
    y = ((np.arange(h) + 0.5) / h)[:, None]  # 0 at the top, 1 at the bottom
    x = ((np.arange(w) + 0.5) / w - 0.5)[None, :]  # -0.5 .. 0.5
    templates = {
        "circle": (x / 0.5) ** 2 + ((y - 0.5) / 0.5) ** 2 <= 1.0,
        "square": np.ones((h, w), dtype=bool),
        "triangle": np.abs(x) <= y / 2,  # apex top centre, base along the bottom
    }
    widths = box.sum(axis=1) / w
    t = y[:, 0]
    widening = float(np.cov(t, widths, bias=True)[0, 1] / t.var()) if h > 1 else 0.0
    profile = {
        "circle": 1 - min(1.0, abs(widening)),
        "square": 1 - min(1.0, abs(widening)),
        "triangle": float(np.clip(widening, 0.0, 1.0)),
    }
    scores = {}
    for name in SHAPES:
        t_mask = np.broadcast_to(templates[name], (h, w))
        iou = (box & t_mask).sum() / max(1, (box | t_mask).sum())
        scores[name] = float((1 - PROFILE_WEIGHT) * iou + PROFILE_WEIGHT * profile[name])
    return scores, float(box.mean()), widening


def _foreground(img: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The shape's colour, each pixel's share of it (0 background .. 1 shape) and the largest shape region; None
    when nothing stands out from the background."""
    dist = np.linalg.norm(img - bg, axis=-1)
    top = float(np.percentile(dist, 99.5))
    if top < MIN_CONTRAST:
        return None
    fg = np.median(img[dist >= 0.75 * top], axis=0)  # the shape's inside, away from blurred edges
    direction = fg - bg
    alpha = (img - bg) @ direction / float(direction @ direction)  # 0 on the background, 1 on the shape
    return fg, alpha, _largest_component(alpha > 0.5)


def shape_mask(image: Image.Image | np.ndarray) -> np.ndarray:
    """Where the image's shape is: a boolean mask of its largest region (all False when there is none)."""
    img = _as_array(image)
    found = _foreground(img, _background(img)[0])
    return np.zeros(img.shape[:2], dtype=bool) if found is None else found[2]


def detect(image: Image.Image | np.ndarray, *, min_area: float = 0.01,
           colours: Mapping[str, tuple[int, int, int]] = COLOURS) -> Detection:
    """Detect the shape, colour, background and style of one image (a PIL image or an RGB array); `colours` is the
    palette to choose from (ALL_COLOURS adds the colours the base model never saw)."""
    img = _as_array(image)
    bg, background_scores = _background(img)
    background = max(background_scores, key=background_scores.get)
    nothing = Detection(shape=UNKNOWN, colour=UNKNOWN, background=background, background_scores=background_scores)

    found = _foreground(img, bg)
    if found is None:
        return nothing
    fg, alpha, mask = found
    area = float(mask.mean())
    if area < min_area:
        return nothing

    style, solidity = _style(alpha > 0.5)
    colour_scores = _colour_scores(fg, colours)
    chroma = float(fg.max() - fg.min())
    colour = max(colour_scores, key=colour_scores.get) if chroma >= MIN_CHROMA else UNKNOWN
    shape_scores, fill_ratio, widening = _shape_scores(mask)
    return Detection(
        shape=max(shape_scores, key=shape_scores.get),
        colour=colour,
        background=background,
        shape_scores=shape_scores,
        colour_scores=colour_scores,
        background_scores=background_scores,
        foreground_rgb=(float(fg[0]), float(fg[1]), float(fg[2])),
        area=area,
        fill_ratio=fill_ratio,
        widening=widening,
        solidity=solidity,
        style=style,
    )


def _truth(spec: ShapeSpec | Mapping[str, Any]) -> dict[str, Any]:
    """The attributes a spec (or a parse_caption dict, None = not asked) says the image should show."""
    if isinstance(spec, ShapeSpec):
        return spec.attributes()
    return {name: spec.get(name) for name in ATTRIBUTES}


def _confusion(pairs: list[tuple[str, str]], labels: Sequence[str]) -> dict[str, dict[str, int]]:
    """Counts[true][predicted] over the given labels plus any others seen, 'unknown' last."""
    seen = [p for pair in pairs for p in pair if p not in labels and p != UNKNOWN]
    names = list(labels) + sorted(set(seen)) + [UNKNOWN]
    table = {true: {pred: 0 for pred in names} for true in names if any(t == true for t, _ in pairs)}
    for true, pred in pairs:
        table[true][pred] += 1
    return table


def accuracy(images: Iterable[Image.Image | np.ndarray],
             specs: Iterable[ShapeSpec | Mapping[str, Any]]) -> dict[str, Any]:
    """Per-attribute accuracy of detect() against specs, plus shape and colour confusion tables."""
    images, specs = list(images), list(specs)
    if len(images) != len(specs):
        raise SdkitError(f"{len(images)} images but {len(specs)} specs", fix="pass one spec per image")
    pairs: dict[str, list[tuple[str, str]]] = {name: [] for name in ATTRIBUTES}
    all_right = 0
    for image, spec in zip(images, specs):
        found = detect(image)
        right = True
        for name, want in _truth(spec).items():
            if want is not None:
                got = getattr(found, name)
                pairs[name].append((want, got))
                right = right and got == want
        all_right += right
    result: dict[str, Any] = {"n": len(images)}
    for name in ATTRIBUTES:
        asked = pairs[name]
        result[name] = sum(t == p for t, p in asked) / len(asked) if asked else None
    result["all"] = all_right / len(images) if images else None
    result["shape_confusion"] = _confusion(pairs["shape"], SHAPES)
    result["colour_confusion"] = _confusion(pairs["colour"], list(COLOURS))
    return result
