"""The shapes world's data: seeded drawing, the caption grammar, and the concepts kept out of training."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from sdkit.errors import SdkitError
from sdkit.shapes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
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
from sdkit.shapes.data import MARGIN, PARTIAL_SUBSETS


def test_sample_is_deterministic_per_seed():
    first, again, other = sample(20, seed=5), sample(20, seed=5), sample(20, seed=6)
    assert [im.tobytes() for im, _, _ in first] == [im.tobytes() for im, _, _ in again]
    assert [(c, s) for _, c, s in first] == [(c, s) for _, c, s in again]
    assert [im.tobytes() for im, _, _ in first] != [im.tobytes() for im, _, _ in other]
    assert all(im.size == (64, 64) and im.mode == "RGB" for im, _, _ in first)


def test_dataset_arrays_are_the_same_examples_as_sample():
    images, captions = dataset_arrays(20, seed=5)
    examples = sample(20, seed=5)
    assert images.shape == (20, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, np.stack([np.asarray(im) for im, _, _ in examples]))
    assert captions == [c for _, c, _ in examples]
    small, _ = dataset_arrays(3, seed=5, size=32)
    assert small.shape == (3, 32, 32, 3)


def test_captions_never_contradict_the_image_and_use_every_form():
    rng = np.random.default_rng(0)
    forms, full = set(), 0
    for _ in range(2000):
        spec = random_spec(rng)
        text = caption(spec, rng=rng, full_probability=0.7)
        asked = parse_caption(text)
        for name, value in asked.items():
            assert value in (None, getattr(spec, name)), (text, spec)
        named = tuple(name for name in ("colour", "shape", "background") if asked[name] is not None)
        forms.add(named)
        full += len(named) == 3
    assert forms == set(PARTIAL_SUBSETS) | {("colour", "shape", "background")}
    assert 0.65 < full / 2000 < 0.75


def test_full_probability_one_and_zero():
    rng = np.random.default_rng(1)
    spec = ShapeSpec(shape="square", colour="green", background="black", size=0.5, cx=0.5, cy=0.5)
    assert {caption(spec, rng=rng, full_probability=1.0) for _ in range(50)} == {"a green square on a black background"}
    partial = {caption(spec, rng=rng, full_probability=0.0) for _ in range(200)}
    assert "a green square on a black background" not in partial
    assert {"", "a green shape", "a square", "a shape on a black background", "a green square"} <= partial
    with pytest.raises(SdkitError):
        caption(spec, rng=rng, full_probability=1.5)


def test_full_captions_are_24_distinct_in_a_fixed_order():
    texts = full_captions()
    assert len(texts) == 24 == len(set(texts))
    assert texts[0] == "a red circle on a white background"
    assert texts == full_captions()
    parsed = {tuple(parse_caption(t).values()) for t in texts}
    assert parsed == set(itertools.product(COLOURS, SHAPES, BACKGROUNDS))


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("", (None, None, None)),
        ("a red shape", ("red", None, None)),
        ("a circle", (None, "circle", None)),
        ("a shape on a black background", (None, None, "black")),
        ("A Green SQUARE.", ("green", "square", None)),
        ("a yellow triangle on a white background", ("yellow", "triangle", "white")),
        ("a blue circle on black", ("blue", "circle", "black")),
        ("a purple star", ("purple", "star", None)),
    ],
)
def test_parse_caption(text, want):
    assert tuple(parse_caption(text).values()) == want


def test_parse_caption_rejects_two_colours_and_round_trips_the_grammar():
    with pytest.raises(SdkitError, match="more than one colour"):
        parse_caption("a red and blue circle")
    for colour, shape, background in itertools.product([None, *COLOURS], [None, *SHAPES], [None, *BACKGROUNDS]):
        text = format_caption(colour=colour, shape=shape, background=background)
        assert parse_caption(text) == {"colour": colour, "shape": shape, "background": background}


def test_default_sampler_never_produces_unseen_concepts():
    rng = np.random.default_rng(2)
    specs = [random_spec(rng) for _ in range(3000)]
    assert {s.shape for s in specs} == set(SHAPES)
    assert {s.colour for s in specs} == set(COLOURS)
    assert {(s.rotation, s.style) for s in specs} == {(0, "fill")}
    for image, text, spec in sample(200, seed=3):
        assert not any(word in text for word in ("star", "purple", "outline", "stripe", "rotat"))
        # every pixel is a blend of the shape's colour and the background: no third colour appears
        pixels = np.asarray(image).reshape(-1, 3).astype(float)
        fg, bg = np.array(COLOURS[spec.colour], float), np.array(BACKGROUNDS[spec.background], float)
        t = (pixels - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg))
        assert np.abs(bg + t[:, None] * (fg - bg) - pixels).max() <= 1.0


def test_shapes_lie_fully_inside_the_image_with_the_expected_area():
    expected = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
    for image, _, spec in sample(300, seed=4):
        assert MARGIN <= spec.cx - spec.size / 2 and spec.cx + spec.size / 2 <= 1 - MARGIN
        assert MARGIN <= spec.cy - spec.size / 2 and spec.cy + spec.size / 2 <= 1 - MARGIN
        arr = np.asarray(image)
        ring = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
        assert (ring == BACKGROUNDS[spec.background]).all()
        coverage = mask(spec).sum() / 255 / 64**2
        assert coverage == pytest.approx(expected[spec.shape] * spec.size**2, rel=0.06)


def test_unseen_concepts_are_drawable_behind_explicit_fields():
    base = ShapeSpec(shape="square", colour="red", background="white", size=0.6, cx=0.5, cy=0.5)
    fill = mask(base)
    star = mask(ShapeSpec(**{**base.to_dict(), "shape": "star"}))
    outline = mask(ShapeSpec(**{**base.to_dict(), "style": "outline"}))
    stripes = mask(ShapeSpec(**{**base.to_dict(), "style": "stripes"}))
    assert 0.2 < star.sum() / fill.sum() < 0.6
    assert 0.2 < outline.sum() / fill.sum() < 0.6 and outline[32, 32] == 0
    assert 0.35 < stripes.sum() / fill.sum() < 0.65
    turned, quarter = (mask(ShapeSpec(**{**base.to_dict(), "rotation": r})) for r in (45, 90))
    assert np.abs(turned.astype(int) - fill).mean() > 20  # a diamond, not the square
    assert np.abs(quarter.astype(int) - fill).mean() < 3  # a square turned 90 degrees is itself
    purple = np.asarray(draw(ShapeSpec(**{**base.to_dict(), "colour": "purple"})))
    assert tuple(purple[32, 32]) == (128, 0, 128)


@pytest.mark.parametrize(
    ("field", "value"),
    [("shape", "hexagon"), ("colour", "orange"), ("background", "grey"), ("style", "dotted")],
)
def test_unknown_vocabulary_raises_with_a_fix(field, value):
    spec = ShapeSpec(shape="circle", colour="red", background="white", size=0.5, cx=0.5, cy=0.5)
    setattr(spec, field, value)
    with pytest.raises(SdkitError, match=f"unknown {field}") as error:
        draw(spec)
    assert error.value.fix


def test_bad_sizes_raise():
    spec = ShapeSpec(shape="circle", colour="red", background="white", size=0.5, cx=0.5, cy=0.5)
    with pytest.raises(SdkitError, match="too small"):
        draw(spec, size=4)
    with pytest.raises(SdkitError, match="size range"):
        random_spec(np.random.default_rng(0), min_size=0.5, max_size=0.99)
