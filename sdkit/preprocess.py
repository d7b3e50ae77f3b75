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

PREPROCESSORS = ("canny", "scribble", "lineart", "none")  # OpenCV only: always offline, no files
WEIGHTED = ("depth", "openpose")  # these read a model the user keeps in an annotators/ folder
ALL_PREPROCESSORS = PREPROCESSORS + WEIGHTED
DEPTH_FOLDER = "depth"  # annotators/depth/: a transformers depth-estimation model (config.json + weights)
OPENPOSE_FILE = "body_pose_model.pth"  # lllyasviel/Annotators' body model, as controlnet_aux reads it
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


def _annotator(name: str, *, root=None):
    """The path of an annotator file or folder in the annotators/ folders, or an error saying where it goes."""
    from sdkit.paths import ModelPaths

    registry = ModelPaths.from_root(root)
    for folder in registry.folders("annotators"):
        for candidate in (folder / name, *sorted(folder.glob(f"*/{name}"))):
            if candidate.exists():
                return candidate
    where = registry.folders("annotators") or [registry.roots[0] / "annotators"]
    raise FileNotFoundError(where[0] / name)


def depth(picture: Image.Image, *, root=None) -> Image.Image:
    """A depth map (near = white) from a transformers depth-estimation model kept in annotators/depth/."""
    try:
        folder = _annotator(DEPTH_FOLDER, root=root)
    except FileNotFoundError as missing:
        raise SdkitError(f"the depth preprocessor needs a depth-estimation model, and {missing} is missing.",
                         fix=f"put a transformers depth model's files (config.json, model.safetensors, "
                             f"preprocessor_config.json; e.g. Intel/dpt-hybrid-midas or depth-anything-small-hf) in "
                             f"{missing}, or pass a ready-made depth map with preprocess none") from None
    import torch
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    try:
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError) as error:
        raise SdkitError(f"{folder} is not a complete depth-estimation model ({str(error).splitlines()[0][:160]}).",
                         fix="it needs config.json, preprocessor_config.json and the weights of one model") from None
    with torch.no_grad():
        predicted = model(**processor(images=picture.convert("RGB"), return_tensors="pt")).predicted_depth
    predicted = torch.nn.functional.interpolate(predicted[:, None], size=picture.size[::-1], mode="bicubic")[0, 0]
    low, high = float(predicted.min()), float(predicted.max())
    scaled = (predicted - low) / (high - low or 1.0) * 255  # MiDaS-style relative depth: larger = nearer
    return Image.fromarray(scaled.clamp(0, 255).round().byte().numpy()).convert("RGB")


def openpose(picture: Image.Image, *, root=None) -> Image.Image:
    """OpenPose skeletons detected in a photo by controlnet_aux, with body_pose_model.pth from annotators/."""
    try:
        path = _annotator(OPENPOSE_FILE, root=root)
    except FileNotFoundError as missing:
        raise SdkitError(f"OpenPose detection needs {OPENPOSE_FILE}, and {missing} is missing.",
                         fix=f"download {OPENPOSE_FILE} (lllyasviel/Annotators) into {missing.args[0].parent}, or "
                             f"draw the pose with sdkit.pose (no file needed) and use preprocess none") from None
    try:
        from controlnet_aux import OpenposeDetector
    except ImportError:
        raise SdkitError("OpenPose detection runs through the controlnet_aux package, which is not installed.",
                         fix="pip install controlnet_aux (into the course's .venv), or draw the pose with sdkit.pose "
                             "and use preprocess none") from None
    detector = OpenposeDetector.from_pretrained(str(path.parent), filename=path.name)
    return detector(picture.convert("RGB"), output_type="pil").convert("RGB")


def run(name: str, picture: Image.Image, **options) -> Image.Image:
    """The named preprocessor's control image ("none": the picture as it is, for a ready-made control image)."""
    if name not in ALL_PREPROCESSORS:
        raise SdkitError(f"no preprocessor {name!r} here.", fix=f"use one of {', '.join(ALL_PREPROCESSORS)}")
    if name == "none":
        return picture.convert("RGB")
    return {"canny": canny, "scribble": scribble, "lineart": lineart, "depth": depth,
            "openpose": openpose}[name](picture, **options)


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
