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
    with pytest.raises(SdkitError, match="no preprocessor 'hed'"):
        preprocess.run("hed", square_picture())
    with pytest.raises(SdkitError, match="no resize mode 'fit'"):
        preprocess.resize(square_picture(), width=64, height=64, mode="fit")


def test_depth_without_its_model_says_which_folder_it_goes_in(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(SdkitError, match=r"the depth preprocessor needs a depth-estimation model, and "
                                         rf"{tmp_path}/annotators/depth is missing"):
        preprocess.depth(square_picture(), root=tmp_path)


def test_depth_runs_a_transformers_depth_model_kept_in_annotators(tmp_path):
    from sdkit.testing import write_depth_model

    write_depth_model(tmp_path / "annotators" / "depth")
    out = preprocess.depth(Image.new("RGB", (80, 60), "red"), root=tmp_path)
    assert out.size == (80, 60) and out.mode == "RGB"
    array = np.asarray(out)
    assert array.min() == 0 and array.max() == 255, "scaled to the full range, near = white"


def test_depth_folder_without_weights_is_refused_by_name(tmp_path):
    (tmp_path / "annotators" / "depth").mkdir(parents=True)
    (tmp_path / "annotators" / "depth" / "config.json").write_text("{}")
    with pytest.raises(SdkitError, match=r"annotators/depth is not a complete depth-estimation model"):
        preprocess.depth(square_picture(), root=tmp_path)


def test_openpose_detection_without_its_file_says_where_it_goes(tmp_path):
    (tmp_path / "annotators").mkdir()
    with pytest.raises(SdkitError, match=rf"needs body_pose_model.pth, and {tmp_path}/annotators/body_pose_model.pth "
                                         r"is missing") as error:
        preprocess.openpose(square_picture(), root=tmp_path)
    assert "sdkit.pose" in error.value.fix
