"""sdkit.pose: the annotator's colours and limb order, presets, OpenPose JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdkit import pose
from sdkit.errors import SdkitError


def pixel(picture, point, *, width: int, height: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(picture)[int(point[1] * height), int(point[0] * width)])


def midpoint(a, b):
    return ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)


@pytest.mark.parametrize("name", pose.PRESETS)
def test_limbs_have_60_percent_of_their_colour_and_joints_their_full_colour(name):
    skeleton = pose.preset(name)
    picture = pose.draw(skeleton, width=512, height=512)
    checked = 0
    for index, ((a, b), colour) in enumerate(zip(pose.LIMBS, pose.COLOURS)):
        p, q = skeleton.points[a - 1], skeleton.points[b - 1]
        if np.hypot((p[0] - q[0]) * 512, (p[1] - q[1]) * 512) < 40:
            continue  # the face's short limbs lie under their joints' circles
        later = [midpoint(skeleton.points[c - 1], skeleton.points[d - 1]) for c, d in pose.LIMBS[index + 1:]]
        middle = midpoint(p, q)
        if any(np.hypot((middle[0] - m[0]) * 512, (middle[1] - m[1]) * 512) < 12 for m in later):
            continue  # drawn over by a later limb, as in the annotator
        assert pixel(picture, middle, width=512, height=512) == tuple(int(c * 0.6) for c in colour), (name, a, b)
        checked += 1
    assert checked >= 10
    neck, right_wrist = skeleton.joint("neck"), skeleton.joint("right_wrist")
    assert pixel(picture, neck, width=512, height=512) == pose.COLOURS[1]
    assert pixel(picture, right_wrist, width=512, height=512) == pose.COLOURS[4]
    assert pixel(picture, (0.02, 0.98), width=512, height=512) == (0, 0, 0), "a black canvas"


def test_a_hidden_joint_draws_neither_it_nor_its_limbs():
    skeleton = pose.preset("standing")
    hidden = pose.Pose(tuple(None if k == "right_elbow" else p for k, p in zip(pose.KEYPOINTS, skeleton.points)))
    picture = pose.draw(hidden, width=256, height=256)
    upper_arm = midpoint(skeleton.joint("right_shoulder"), skeleton.joint("right_elbow"))
    assert pixel(picture, upper_arm, width=256, height=256) == (0, 0, 0)


def test_moving_a_joint_moves_it_in_the_picture():
    moved = pose.preset("standing").moved("right_wrist", 0.2, 0.3)
    picture = pose.draw(moved, width=256, height=256)
    assert pixel(picture, (0.2, 0.3), width=256, height=256) == pose.COLOURS[4]


def test_openpose_json_round_trips_and_never_overwrites(tmp_path):
    skeleton = pose.preset("kneeling_angle").moved("nose", 0.25, 0.5)
    path = pose.save_json(skeleton, tmp_path / "kneel.json", width=512, height=768)
    data = json.loads(path.read_text())
    assert data["canvas_width"] == 512 and len(data["people"][0]["pose_keypoints_2d"]) == 54
    assert data["people"][0]["pose_keypoints_2d"][:3] == [128.0, 384.0, 1.0]
    back = pose.load_json(path)[0]
    assert all(abs(a[0] - b[0]) < 1e-3 and abs(a[1] - b[1]) < 1e-3 for a, b in zip(back.points, skeleton.points))
    with pytest.raises(SdkitError, match="already exists"):
        pose.save_json(skeleton, path, width=512, height=768)


@pytest.mark.parametrize("text, message", [("{}", "not OpenPose JSON"), ('{"people": [{"pose_keypoints_2d": [1, 2]}]}',
                                                                        "1 keypoints|0 keypoints"), ("not json", "not OpenPose JSON")])
def test_bad_json_is_refused_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SdkitError, match=message) as error:
        pose.load_json(path)
    assert "bad.json" in str(error.value)


def test_unknown_presets_and_joints_are_refused():
    with pytest.raises(SdkitError, match="no pose preset 'dancing'"):
        pose.preset("dancing")
    with pytest.raises(SdkitError, match="'tail' is not an OpenPose joint"):
        pose.preset("standing").moved("tail", 0.5, 0.5)


def test_the_editor_moves_hides_and_resets_joints_and_redraws():
    editor = pose.Editor(start="kneeling", width=128, height=128, px=128)
    first = editor.image.value
    editor.joint.value = "left_wrist"
    assert (editor.x.value, editor.y.value) == pose.preset("kneeling").joint("left_wrist")
    editor.x.value, editor.y.value = 0.9, 0.1
    assert editor.pose.joint("left_wrist") == (0.9, 0.1) and editor.image.value != first
    assert pixel(editor.picture(), (0.9, 0.1), width=128, height=128) == pose.COLOURS[7]
    editor.hidden.value = True
    assert editor.pose.joint("left_wrist") is None
    editor.preset.value = "standing"
    assert editor.pose == pose.preset("standing") and editor.hidden.value is False
