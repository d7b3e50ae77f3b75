"""Body poses for OpenPose ControlNets: 18 keypoints, drawn exactly as the ControlNet annotator draws them.

    skeleton = pose.preset("kneeling")                      # 18 (x, y) in 0..1 of the picture, None = hidden
    picture = pose.draw(skeleton, width=512, height=512)    # what an OpenPose ControlNet was trained on
    pose.save_json(skeleton, "kneel.json", width=512, height=512)   # OpenPose JSON, as editors exchange it
    skeleton = pose.load_json("kneel.json")

OpenPose ControlNets learned from skeletons drawn by the annotator's `draw_bodypose` (ControlNet 1.1,
controlnet_aux): black canvas; each of 17 limbs an ellipse 4 px half-thick between its two joints, filled with 60% of
its colour, in a fixed order; then each of the 18 joints a filled circle of radius 4 in its full colour. A skeleton
in other colours or another limb order reads as noise to those models, so this module draws with the same numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdkit.errors import SdkitError

# The COCO-18 order OpenPose uses.
KEYPOINTS = ("nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
             "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
             "right_eye", "left_eye", "right_ear", "left_ear")
# The annotator's limbSeq (1-based joint numbers) and colours, in drawing order.
LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
         (2, 1), (1, 15), (15, 17), (1, 16), (16, 18))
COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
STICK_WIDTH, JOINT_RADIUS, LIMB_SHADE = 4, 4, 0.6

Point = tuple[float, float] | None


@dataclass(frozen=True)
class Pose:
    """One body: 18 joints in KEYPOINTS order, each (x, y) as fractions of the picture's width and height, or None."""

    points: tuple[Point, ...]

    def __post_init__(self) -> None:
        if len(self.points) != len(KEYPOINTS):
            raise SdkitError(f"a body pose has {len(KEYPOINTS)} joints, not {len(self.points)}.",
                             fix="give one (x, y) or None per joint, in OpenPose's COCO-18 order (pose.KEYPOINTS)")

    def joint(self, name: str) -> Point:
        """Where one joint is (None when hidden)."""
        return self.points[_index(name)]

    def moved(self, name: str, x: float, y: float) -> "Pose":
        """The same pose with one joint at (x, y)."""
        points = list(self.points)
        points[_index(name)] = (float(x), float(y))
        return Pose(tuple(points))


def _index(name: str) -> int:
    """A joint's position in KEYPOINTS, with a clear error for a name that is not one."""
    try:
        return KEYPOINTS.index(name)
    except ValueError:
        raise SdkitError(f"{name!r} is not an OpenPose joint.", fix=f"use one of {', '.join(KEYPOINTS)}") from None


def draw(pose: Pose | list[Pose], *, width: int = 512, height: int = 512) -> Image.Image:
    """The skeleton picture of one or more bodies, drawn as the ControlNet annotator's `draw_bodypose` draws it."""
    import cv2

    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for body in pose if isinstance(pose, list) else [pose]:
        for (a, b), colour in zip(LIMBS, COLOURS):
            p, q = body.points[a - 1], body.points[b - 1]
            if p is None or q is None:
                continue
            xs, ys = np.array([p[0], q[0]]) * width, np.array([p[1], q[1]]) * height
            length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            polygon = cv2.ellipse2Poly((int(xs.mean()), int(ys.mean())), (int(length / 2), STICK_WIDTH), int(angle),
                                       0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, [int(c * LIMB_SHADE) for c in colour])
        for point, colour in zip(body.points, COLOURS):
            if point is not None:
                cv2.circle(canvas, (int(point[0] * width), int(point[1] * height)), JOINT_RADIUS, colour, thickness=-1)
    return Image.fromarray(canvas)


# --- presets: a figure about 80% of the picture's height, facing the viewer ----------------------------------------

_HEAD = {"nose": (0.50, 0.14), "right_eye": (0.48, 0.12), "left_eye": (0.52, 0.12), "right_ear": (0.46, 0.13),
         "left_ear": (0.54, 0.13), "neck": (0.50, 0.22), "right_shoulder": (0.42, 0.23), "left_shoulder": (0.58, 0.23)}
_PRESETS: dict[str, dict[str, tuple[float, float]]] = {
    "standing": {"right_elbow": (0.39, 0.37), "right_wrist": (0.38, 0.50), "left_elbow": (0.61, 0.37),
                 "left_wrist": (0.62, 0.50), "right_hip": (0.45, 0.52), "right_knee": (0.45, 0.70),
                 "right_ankle": (0.45, 0.88), "left_hip": (0.55, 0.52), "left_knee": (0.55, 0.70),
                 "left_ankle": (0.55, 0.88)},
    "arms_up": {"right_elbow": (0.36, 0.13), "right_wrist": (0.34, 0.03), "left_elbow": (0.64, 0.13),
                "left_wrist": (0.66, 0.03), "right_hip": (0.45, 0.52), "right_knee": (0.45, 0.70),
                "right_ankle": (0.45, 0.88), "left_hip": (0.55, 0.52), "left_knee": (0.55, 0.70),
                "left_ankle": (0.55, 0.88)},
    "sitting": {"right_elbow": (0.39, 0.37), "right_wrist": (0.42, 0.50), "left_elbow": (0.61, 0.37),
                "left_wrist": (0.58, 0.50), "right_hip": (0.45, 0.52), "right_knee": (0.41, 0.58),
                "right_ankle": (0.41, 0.80), "left_hip": (0.55, 0.52), "left_knee": (0.59, 0.58),
                "left_ankle": (0.59, 0.80)},
    # The blog's kneeling person: upright (thighs vertical, shins on the floor behind the knees) ...
    "kneeling": {"right_elbow": (0.39, 0.37), "right_wrist": (0.40, 0.50), "left_elbow": (0.61, 0.37),
                 "left_wrist": (0.60, 0.50), "right_hip": (0.45, 0.52), "right_knee": (0.44, 0.74),
                 "right_ankle": (0.43, 0.80), "left_hip": (0.55, 0.52), "left_knee": (0.56, 0.74),
                 "left_ankle": (0.57, 0.80)},
    # ... and at an angle: turned a quarter towards the left of the picture, sitting back towards the heels.
    "kneeling_angle": {"right_elbow": (0.41, 0.38), "right_wrist": (0.44, 0.50), "left_elbow": (0.60, 0.38),
                       "left_wrist": (0.58, 0.51), "right_hip": (0.47, 0.55), "right_knee": (0.38, 0.70),
                       "right_ankle": (0.52, 0.76), "left_hip": (0.55, 0.55), "left_knee": (0.48, 0.74),
                       "left_ankle": (0.62, 0.78)},
}
PRESETS = tuple(_PRESETS)


def preset(name: str) -> Pose:
    """A ready-made pose: standing, arms_up, sitting, kneeling (upright) or kneeling_angle."""
    if name not in _PRESETS:
        raise SdkitError(f"no pose preset {name!r}.", fix=f"use one of {', '.join(PRESETS)}")
    joints = _HEAD | _PRESETS[name]
    if name == "kneeling_angle":  # the turned body: head and shoulders a little to the left and lower
        joints = {k: (x - 0.03, y + 0.03) if k in _HEAD else (x, y) for k, (x, y) in joints.items()}
        joints["left_shoulder"] = (joints["left_shoulder"][0] - 0.03, joints["left_shoulder"][1])
    return Pose(tuple(joints[k] for k in KEYPOINTS))


# --- OpenPose JSON ------------------------------------------------------------------------------------------------


def to_json(poses: Pose | list[Pose], *, width: int, height: int) -> dict:
    """OpenPose's JSON (`people[].pose_keypoints_2d`: x, y in pixels and a confidence, 0 0 0 for a hidden joint),
    with the canvas size as the ControlNet extension's pose editor writes it."""
    people = []
    for body in poses if isinstance(poses, list) else [poses]:
        flat: list[float] = []
        for point in body.points:
            flat += [0.0, 0.0, 0.0] if point is None else [round(point[0] * width, 2), round(point[1] * height, 2), 1.0]
        people.append({"pose_keypoints_2d": flat})
    return {"people": people, "canvas_width": width, "canvas_height": height}


def save_json(poses: Pose | list[Pose], path: str | Path, *, width: int, height: int) -> Path:
    """Write OpenPose JSON to a new file (never over an existing one)."""
    path = Path(path)
    if path.exists():
        raise SdkitError(f"{path} already exists; sdkit never overwrites a file.", fix="choose another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("x") as f:
        json.dump(to_json(poses, width=width, height=height), f, indent=1)
    return path


def load_json(path: str | Path) -> list[Pose]:
    """The bodies in an OpenPose JSON file (pixel coordinates, divided by its canvas size)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        width, height = float(data.get("canvas_width", 1)), float(data.get("canvas_height", 1))
        poses = []
        for person in data["people"]:
            values = [float(v) for v in person["pose_keypoints_2d"]]
            if len(values) < 3 * len(KEYPOINTS):
                raise ValueError(f"{len(values) // 3} keypoints, expected {len(KEYPOINTS)}")
            triples = [values[i:i + 3] for i in range(0, 3 * len(KEYPOINTS), 3)]
            poses.append(Pose(tuple(None if c <= 0 else (x / width, y / height) for x, y, c in triples)))
    except FileNotFoundError:
        raise SdkitError(f"{path} does not exist.", fix="check the path") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise SdkitError(f"{path} is not OpenPose JSON with body keypoints ({error}).",
                         fix='expected {"people": [{"pose_keypoints_2d": [x, y, c, ...]}], "canvas_width": W, ...}') from None
    return poses


# --- the editor ---------------------------------------------------------------------------------------------------


class Editor:
    """An ipywidgets pose editor: a preset, then a joint and its x/y sliders; the skeleton redraws as they move.

        editor = pose.Editor(start="kneeling")     # display editor.widget; editor.pose and editor.picture() follow it
    """

    def __init__(self, *, start: str = "kneeling", width: int = 512, height: int = 512, px: int = 256) -> None:
        import ipywidgets as w

        from sdkit.widgets import png

        self.width, self.height, self._png, self._px = width, height, png, px
        self.pose = preset(start)
        self.preset = w.Dropdown(options=PRESETS, value=start, description="preset")
        self.joint = w.Dropdown(options=KEYPOINTS, value="right_wrist", description="joint")
        self.x = w.FloatSlider(min=0, max=1, step=0.01, description="x", continuous_update=True)
        self.y = w.FloatSlider(min=0, max=1, step=0.01, description="y", continuous_update=True)
        self.hidden = w.Checkbox(description="hidden")
        self.image = w.Image(format="png", layout=w.Layout(width=f"{px}px", height=f"{round(px * height / width)}px"))
        for name, control in (("preset", self.preset), ("joint", self.joint), ("x", self.x), ("y", self.y),
                              ("hidden", self.hidden)):
            control.add_class(f"sdkit-pose-{name}")
        self._quiet = False
        self.preset.observe(lambda _c: self._use_preset(), names="value")
        self.joint.observe(lambda _c: self._show_joint(), names="value")
        for control in (self.x, self.y, self.hidden):
            control.observe(lambda _c: self._move(), names="value")
        self._show_joint()
        self._redraw()
        self.widget = w.HBox([self.image, w.VBox([self.preset, self.joint, self.x, self.y, self.hidden])])

    def picture(self) -> Image.Image:
        """The skeleton as it stands, at the editor's size."""
        return draw(self.pose, width=self.width, height=self.height)

    def _use_preset(self) -> None:
        self.pose = preset(self.preset.value)
        self._show_joint()
        self._redraw()

    def _show_joint(self) -> None:
        """The chosen joint's place into the sliders (without moving anything)."""
        point = self.pose.joint(self.joint.value)
        self._quiet = True
        try:
            self.hidden.value = point is None
            if point is not None:
                self.x.value, self.y.value = point
        finally:
            self._quiet = False

    def _move(self) -> None:
        if self._quiet:
            return
        if self.hidden.value:
            points = list(self.pose.points)
            points[KEYPOINTS.index(self.joint.value)] = None
            self.pose = Pose(tuple(points))
        else:
            self.pose = self.pose.moved(self.joint.value, self.x.value, self.y.value)
        self._redraw()

    def _redraw(self) -> None:
        self.image.value = self._png(draw(self.pose, width=self._px, height=round(self._px * self.height / self.width)))
