"""The classical shapes detector: accurate on clean data, robust to noise, blur, JPEG and off colours."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdkit.errors import SdkitError
from sdkit.shapes import UNKNOWN, ShapeSpec, accuracy, detect, draw, mask, sample

N = 600


@pytest.fixture(scope="module")
def examples() -> tuple[list[Image.Image], list[ShapeSpec]]:
    """600 seeded training images and their specs."""
    data = sample(N, seed=123)
    return [im for im, _, _ in data], [spec for _, _, spec in data]


def _noisy(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Slight blur, then gaussian noise of sigma 20/255."""
    arr = np.asarray(image.filter(ImageFilter.GaussianBlur(0.8)), dtype=np.float32)
    return np.clip(arr + rng.normal(0, 20, arr.shape), 0, 255).round().astype(np.uint8)


def _jpeg(image: Image.Image, quality: int = 20) -> Image.Image:
    """The image after a round trip through a low-quality JPEG."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _painted(spec: ShapeSpec, rgb: tuple[int, int, int], background: tuple[int, int, int]) -> np.ndarray:
    """The spec's shape in any RGB colour over any RGB background (anti-aliased)."""
    a = mask(spec).astype(np.float32)[..., None] / 255
    return np.round(np.array(background) * (1 - a) + np.array(rgb) * a).astype(np.uint8)


def _assert_at_least(result: dict, floor: float) -> None:
    """Every attribute's accuracy is at least floor; the confusion tables count every image."""
    for name in ("shape", "colour", "background", "all"):
        assert result[name] >= floor, (name, result)
    assert sum(sum(row.values()) for row in result["shape_confusion"].values()) == N
    assert sum(sum(row.values()) for row in result["colour_confusion"].values()) == N


def test_clean_accuracy_is_at_least_99_percent(examples):
    images, specs = examples
    result = accuracy(images, specs)
    _assert_at_least(result, 0.99)  # measured: 1.0 on all three attributes
    assert result["n"] == N


def test_noise_and_blur_accuracy_is_at_least_95_percent(examples):
    images, specs = examples
    rng = np.random.default_rng(0)
    _assert_at_least(accuracy([_noisy(im, rng) for im in images], specs), 0.95)  # measured: 1.0


def test_jpeg_accuracy_is_at_least_95_percent(examples):
    images, specs = examples
    _assert_at_least(accuracy([_jpeg(im) for im in images], specs), 0.95)  # measured: 1.0


@pytest.mark.parametrize("background", ["white", "black"])
def test_no_foreground_gives_unknown_shape_and_colour(background):
    value = 255 if background == "white" else 0
    blank = np.full((64, 64, 3), value, dtype=np.uint8)
    noisy = np.clip(blank + np.random.default_rng(0).normal(0, 20, blank.shape), 0, 255).astype(np.uint8)
    speck = blank.copy()
    speck[30:32, 30:32] = (255, 0, 0) if background == "black" else (0, 0, 255)
    for image in (blank, noisy, speck):
        found = detect(image)
        assert (found.shape, found.colour, found.background) == (UNKNOWN, UNKNOWN, background)
        assert found.confidence["shape"] == 0.0


@pytest.mark.parametrize(
    ("rgb", "want"),
    [
        ((230, 90, 30), "red"),  # orange-ish red
        ((255, 170, 170), "red"),  # washed-out pink
        ((150, 20, 10), "red"),  # dark red
        ((210, 235, 40), "yellow"),  # greenish yellow
        ((110, 220, 60), "green"),  # yellowish green
        ((70, 80, 210), "blue"),
    ],
)
@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0)])
def test_impure_colours_go_to_the_nearest_primary(rgb, want, background):
    spec = ShapeSpec(shape="triangle", colour="red", background="white", size=0.6, cx=0.5, cy=0.5)
    found = detect(_painted(spec, rgb, background))
    assert (found.colour, found.shape) == (want, "triangle")


def test_grey_shape_has_no_colour():
    spec = ShapeSpec(shape="square", colour="red", background="black", size=0.6, cx=0.5, cy=0.5)
    found = detect(_painted(spec, (160, 160, 160), (0, 0, 0)))
    assert (found.shape, found.colour) == ("square", UNKNOWN)


@pytest.mark.parametrize(
    ("bg", "want"), [((235, 225, 205), "white"), ((40, 35, 55), "black"), ((160, 150, 140), "white")]
)
def test_unclean_background_goes_to_the_nearest(bg, want):
    spec = ShapeSpec(shape="circle", colour="blue", background="white", size=0.5, cx=0.4, cy=0.6)
    found = detect(_painted(spec, (0, 0, 255), bg))
    assert (found.background, found.shape, found.colour) == (want, "circle", "blue")


def test_features_match_the_geometry():
    specs = {name: ShapeSpec(shape=name, colour="green", background="black", size=0.7, cx=0.5, cy=0.5)
             for name in ("circle", "square", "triangle")}
    found = {name: detect(draw(spec)) for name, spec in specs.items()}
    assert found["square"].fill_ratio > 0.95
    assert found["circle"].fill_ratio == pytest.approx(np.pi / 4, abs=0.04)
    assert found["triangle"].fill_ratio == pytest.approx(0.5, abs=0.06)
    assert found["triangle"].widening > 0.8
    assert abs(found["circle"].widening) < 0.1 and abs(found["square"].widening) < 0.1
    for name, detection in found.items():
        assert detection.shape == name and detection.confidence["shape"] > 0.9
        assert detection.area == pytest.approx(detection.fill_ratio * 0.7**2, rel=0.1)


def test_upside_down_triangle_is_not_a_triangle():
    spec = ShapeSpec(shape="triangle", colour="red", background="white", size=0.7, cx=0.5, cy=0.5, rotation=180)
    found = detect(draw(spec))
    assert found.widening < -0.8 and found.shape != "triangle"


def test_detect_reads_pil_uint8_and_float_images_alike():
    spec = ShapeSpec(shape="square", colour="yellow", background="white", size=0.5, cx=0.5, cy=0.5)
    image = draw(spec)
    arr = np.asarray(image)
    results = [detect(x) for x in (image, arr, arr.astype(np.float32) / 255, np.dstack([arr, np.full((64, 64), 255)]))]
    assert {(r.shape, r.colour, r.background) for r in results} == {("square", "yellow", "white")}
    with pytest.raises(SdkitError, match="cannot read an image"):
        detect(np.zeros((64, 64, 5)))


def test_accuracy_skips_unasked_attributes_and_fills_confusion_tables():
    spec = ShapeSpec(shape="circle", colour="red", background="black", size=0.5, cx=0.5, cy=0.5)
    images = [draw(spec)] * 3
    wanted = [spec, {"shape": "square", "colour": None}, {"colour": "blue", "background": "black"}]
    result = accuracy(images, wanted)
    assert result["shape"] == 0.5 and result["colour"] == 0.5 and result["background"] == 1.0
    assert result["all"] == pytest.approx(1 / 3)
    assert result["shape_confusion"]["circle"]["circle"] == 1
    assert result["shape_confusion"]["square"]["circle"] == 1
    assert result["colour_confusion"]["blue"]["red"] == 1 and "green" not in result["colour_confusion"]
    with pytest.raises(SdkitError, match="one spec per image"):
        accuracy(images, wanted[:2])


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
@pytest.mark.parametrize("size", [0.35, 0.8])
def test_style_tells_outlines_from_filled_shapes(shape, size):
    from sdkit.shapes.data import ShapeSpec, draw

    for style in ("fill", "outline"):
        spec = ShapeSpec(shape=shape, colour="green", background="white", size=size, cx=0.5, cy=0.5, style=style)
        found = detect(draw(spec))
        assert (found.style, found.shape, found.colour) == (style, shape, "green")


def test_the_extra_colour_is_seen_only_with_the_full_palette():
    from sdkit.shapes.data import ShapeSpec, draw
    from sdkit.shapes.detect import ALL_COLOURS

    purple = draw(ShapeSpec(shape="circle", colour="purple", background="black", size=0.6, cx=0.5, cy=0.5))
    assert detect(purple, colours=ALL_COLOURS).colour == "purple"
    assert detect(purple).colour in ("red", "blue"), "the base palette has no purple"
    red = draw(ShapeSpec(shape="circle", colour="red", background="black", size=0.6, cx=0.5, cy=0.5))
    assert detect(red, colours=ALL_COLOURS).colour == "red"
