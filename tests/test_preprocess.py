"""sdkit.preprocess: control images from pictures, and A1111's resize modes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdkit import preprocess
from sdkit.errors import SdkitError
from sdkit.shapes import data


def square_picture() -> Image.Image:
    return data.draw(data.ShapeSpec(shape="square", colour="red", background="white", size=0.5, cx=0.5, cy=0.5),
                     size=128)


def test_canny_finds_the_outline_and_nothing_inside_or_outside():
    edges = np.asarray(preprocess.run("canny", square_picture()).convert("L"))
    assert edges[64, 28:36].max() == 255, "the square's left side, at x = 32"
    assert edges[64, 64] == 0 and edges[5, 5] == 0, "no edge in flat colour"
    assert set(np.unique(edges)) <= {0, 255}


def test_scribble_and_lineart_give_white_lines_on_black():
    drawing = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(drawing).line((10, 32, 54, 32), fill="black", width=3)
    for name in ("scribble", "lineart"):
        control = np.asarray(preprocess.run(name, drawing).convert("L"))
        assert control[32, 32] == 255 and control[5, 5] == 0, name


def test_none_passes_a_ready_control_image_through():
    picture = square_picture()
    assert np.array_equal(np.asarray(preprocess.run("none", picture)), np.asarray(picture))


@pytest.mark.parametrize("mode", ["just_resize", "crop_and_resize", "resize_and_fill"])
def test_the_three_resize_modes_keep_or_change_the_aspect_as_a1111_does(mode):
    wide = Image.new("RGB", (200, 100), "white")  # 2:1 into a 1:1 picture
    out = preprocess.resize(wide, width=100, height=100, mode=mode)
    assert out.size == (100, 100)
    array = np.asarray(out)
    if mode == "resize_and_fill":
        assert array[10, 50].max() == 0 and array[50, 50].min() == 255, "black bands above and below"
    else:
        assert array.min() == 255, "stretched or cropped: no band"


def test_unknown_names_are_refused():
    with pytest.raises(SdkitError, match="no preprocessor 'depth'"):
        preprocess.run("depth", square_picture())
    with pytest.raises(SdkitError, match="no resize mode 'fit'"):
        preprocess.resize(square_picture(), width=64, height=64, mode="fit")
