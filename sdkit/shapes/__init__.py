"""The shapes world: a tiny text-to-image world whose prompt-following a classical detector can check."""

from __future__ import annotations

from sdkit.shapes.data import (
    BACKGROUNDS,
    COLOURS,
    EXTRA_COLOURS,
    EXTRA_SHAPES,
    SHAPES,
    STYLES,
    ShapeSpec,
    caption,
    dataset_arrays,
    draw,
    format_caption,
    full_captions,
    mask,
    parse_caption,
    random_spec,
    sample,
)
from sdkit.shapes.detect import UNKNOWN, Detection, accuracy, detect

__all__ = [
    "BACKGROUNDS", "COLOURS", "EXTRA_COLOURS", "EXTRA_SHAPES", "SHAPES", "STYLES", "ShapeSpec", "caption",
    "dataset_arrays", "draw", "format_caption", "full_captions", "mask", "parse_caption", "random_spec", "sample",
    "UNKNOWN", "Detection", "accuracy", "detect",
]
