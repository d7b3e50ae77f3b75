"""Control images for ControlNet, made offline with OpenCV: canny edges, scribbles, inverted line art, resizing.

    edges = preprocess.run("canny", photo)                         # white edges on black, as canny ControlNets learned
    control = preprocess.resize(edges, width=512, height=768, mode="crop_and_resize")

Each preprocessor gives what its ControlNets were trained on: white lines on a black background. The three resize
modes are A1111's ControlNet extension's: "just resize" (stretch to the size), "crop and resize" (scale to cover,
cut the middle), "resize and fill" (scale to fit, fill the rest with black, which control images read as "nothing").
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdkit.errors import SdkitError

PREPROCESSORS = ("canny", "scribble", "lineart", "none")
RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")


def _grey(picture: Image.Image) -> np.ndarray:
    """The picture as an 8-bit grey array."""
    return np.asarray(picture.convert("L"))


def canny(picture: Image.Image, *, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges (A1111's default thresholds 100 and 200): white 1 px edges on black."""
    import cv2

    return Image.fromarray(cv2.Canny(_grey(picture), low, high)).convert("RGB")


def scribble(picture: Image.Image, *, threshold: int = 127) -> Image.Image:
    """A drawing (dark strokes on a light background) as scribble ControlNets read it: white strokes on black."""
    return Image.fromarray(np.where(_grey(picture) < threshold, 255, 0).astype(np.uint8)).convert("RGB")


def lineart(picture: Image.Image) -> Image.Image:
    """Line art drawn black on white, inverted to white on black (A1111's "invert" preprocessor)."""
    return Image.fromarray(255 - _grey(picture)).convert("RGB")


def run(name: str, picture: Image.Image, **options) -> Image.Image:
    """The named preprocessor's control image ("none": the picture as it is, for a ready-made control image)."""
    if name not in PREPROCESSORS:
        raise SdkitError(f"no preprocessor {name!r} here.",
                         fix=f"use one of {', '.join(PREPROCESSORS)}; depth and OpenPose detection need their own "
                             "model files (see the README)")
    if name == "none":
        return picture.convert("RGB")
    return {"canny": canny, "scribble": scribble, "lineart": lineart}[name](picture, **options)


def resize(control: Image.Image, *, width: int, height: int, mode: str = "crop_and_resize") -> Image.Image:
    """The control image at the generation size, by one of A1111's three resize modes."""
    if mode not in RESIZE_MODES:
        raise SdkitError(f"no resize mode {mode!r}.", fix=f"use one of {', '.join(RESIZE_MODES)}")
    resample = Image.Resampling.NEAREST  # keeps 1 px lines and pose colours as they are, as A1111 does for maps
    if mode == "just_resize":
        return control.resize((width, height), resample)
    cover = max(width / control.width, height / control.height)
    fit = min(width / control.width, height / control.height)
    scale = cover if mode == "crop_and_resize" else fit
    scaled = control.resize((max(1, round(control.width * scale)), max(1, round(control.height * scale))), resample)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))  # crops or pads the middle
    return canvas
