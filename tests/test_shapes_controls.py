from __future__ import annotations

import numpy as np
import pytest

from sdkit.shapes import controls, data
from sdkit.shapes.train import Plan


@pytest.fixture
def spec():
    return data.ShapeSpec(shape="square", colour="green", background="black", size=0.5, cx=0.4, cy=0.6)


def test_blob_is_the_shapes_silhouette_in_white_on_black(spec):
    blob = np.asarray(controls.control_image(spec, kind="blob"))
    assert set(np.unique(blob)) == {0, 255}
    assert np.array_equal(blob[..., 0] == 255, data.mask(spec) >= 128)


def test_edges_lie_on_the_shapes_border_only(spec):
    edges = np.asarray(controls.control_image(spec, kind="edges"))[..., 0] > 0
    inside = data.mask(spec) >= 128
    core, near = inside.copy(), inside.copy()  # the silhouette shrunk and grown by 2 px
    for axis in (0, 1):
        for shift in (-2, -1, 1, 2):
            core &= np.roll(inside, shift, axis=axis)
            near |= np.roll(inside, shift, axis=axis)
    assert edges.sum() > 40
    assert not (edges & core).any() and not (edges & ~near).any()


def test_training_batches_are_seeded_and_in_range():
    plan = Plan(steps=1, batch=4, lr=1e-3)
    a, b = controls.batch(3, plan), controls.batch(3, plan)
    assert a[2] == b[2] and np.array_equal(a[1].numpy(), b[1].numpy())
    pixels, control, _ = a
    assert pixels.shape == control.shape == (4, 3, 64, 64)
    assert pixels.min() >= -1 and pixels.max() <= 1 and control.min() == 0 and control.max() == 1


def test_unknown_kind_is_refused(spec):
    with pytest.raises(ValueError, match="unknown control kind"):
        controls.control_image(spec, kind="depth")


def test_layout_editor_redraws_as_its_sliders_move():
    editor = controls.LayoutEditor(shape="circle", cx=0.3, cy=0.3, size=0.4, kind="blob")
    before, shown = np.asarray(editor.picture()), editor.image.value
    editor.x.value = 0.7
    after = np.asarray(editor.picture())
    assert editor.image.value != shown
    columns = lambda a: np.nonzero(a[..., 0].any(axis=0))[0].mean()  # noqa: E731
    assert columns(after) - columns(before) == pytest.approx(0.4 * 64, abs=1.5)
