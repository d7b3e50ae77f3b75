"""One registry of model folders (ComfyUI's names), their extensions, and lookup with clear errors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sdkit.errors import SdkitError

WEIGHTS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
BUNDLED_ROOT = Path(__file__).resolve().parent.parent / "models"

# ComfyUI folder name -> (aliases ComfyUI also accepts, extensions)
FOLDERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "checkpoints": ((), WEIGHTS),
    "loras": ((), WEIGHTS),
    "embeddings": ((), WEIGHTS),
    "controlnet": (("t2i_adapter",), WEIGHTS),
    "vae": ((), WEIGHTS),
    "vae_approx": ((), WEIGHTS),
    "upscale_models": ((), WEIGHTS),
    "annotators": ((), WEIGHTS + (".json",)),  # preprocessor weights (depth, OpenPose), as lllyasviel/Annotators
    "diffusion_models": (("unet",), WEIGHTS + (".gguf",)),
    "text_encoders": (("clip",), WEIGHTS + (".gguf",)),
}

# An A1111 / Forge install keeps the same things under other names.
A1111_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("models/Stable-diffusion",),
    "loras": ("models/Lora", "models/LyCORIS"),
    "embeddings": ("embeddings",),
    "controlnet": ("models/ControlNet",),
    "vae": ("models/VAE",),
    "vae_approx": ("models/VAE-approx",),
    "upscale_models": ("models/ESRGAN", "models/RealESRGAN"),
    "annotators": ("extensions/sd-webui-controlnet/annotator/downloads",),
    "diffusion_models": ("models/unet",),
    "text_encoders": ("models/text_encoder",),
}


def _bare(name: str) -> str:
    """A model name in lower case without its weight-file extension."""
    lower = name.lower()
    for ext in WEIGHTS + (".gguf",):
        if lower.endswith(ext):
            return lower[: -len(ext)]
    return lower


def _layout(root: Path) -> dict[str, list[Path]]:
    """Map each folder kind to the directories that hold it under `root`, whatever the install."""
    if (root / "models" / "Stable-diffusion").is_dir():
        return {kind: [root / sub for sub in subs] for kind, subs in A1111_FOLDERS.items()}
    if (root / "Stable-diffusion").is_dir():  # an A1111 `models` folder given directly
        install = root.parent
        return {kind: [install / sub for sub in subs] for kind, subs in A1111_FOLDERS.items()}
    if (root / "models" / "checkpoints").is_dir() and not (root / "checkpoints").is_dir():
        root = root / "models"  # a ComfyUI install rather than its models folder
    return {kind: [root / kind] + [root / alias for alias in aliases] for kind, (aliases, _) in FOLDERS.items()}


def default_roots() -> list[Path]:
    """The model roots searched when none is given: $SDKIT_MODELS or ./models, then the bundled models."""
    roots = []
    if os.environ.get("SDKIT_MODELS"):
        roots.append(Path(os.environ["SDKIT_MODELS"]).expanduser())
    elif Path("models").is_dir():
        roots.append(Path("models").resolve())
    if BUNDLED_ROOT.resolve() not in [r.resolve() for r in roots]:
        roots.append(BUNDLED_ROOT)
    return roots


@dataclass
class ModelPaths:
    """The model folders of one or more roots (ComfyUI, A1111 or sdkit layout), searched in order."""

    roots: list[Path]

    @classmethod
    def from_root(cls, root: str | Path | None = None) -> "ModelPaths":
        """Registry for `root` (then the bundled models), or for the default roots."""
        if root is None:
            return cls(default_roots())
        root = Path(root).expanduser()
        if not root.is_dir():
            raise SdkitError(
                f"The models root {root} does not exist or is not a folder.",
                fix="point SDKIT_MODELS (or the root argument) at a ComfyUI/A1111 install or its models folder",
            )
        return cls([root] + ([BUNDLED_ROOT] if root.resolve() != BUNDLED_ROOT.resolve() else []))

    def folders(self, kind: str) -> list[Path]:
        """The existing directories that hold models of `kind`, in search order."""
        if kind not in FOLDERS:
            raise SdkitError(f"Unknown model folder {kind!r}; known: {', '.join(FOLDERS)}.", fix="use one of those")
        return [d for root in self.roots for d in _layout(root)[kind] if d.is_dir()]

    def list(self, kind: str) -> list[str]:
        """Names (paths relative to their folder, with '/') of the model files of `kind`."""
        extensions = FOLDERS[kind][1] if kind in FOLDERS else ()
        names: list[str] = []
        for folder in self.folders(kind):
            seen: set[str] = set()
            for top, dirs, files in os.walk(folder, followlinks=True):  # as ComfyUI and A1111 do
                real = os.path.realpath(top)
                if real in seen:  # a symlink loop (a folder linking to itself or a parent): each folder once
                    dirs.clear()
                    continue
                seen.add(real)
                dirs.sort()
                for file in sorted(files):
                    path = Path(top) / file
                    name = path.relative_to(folder).as_posix()
                    if path.suffix.lower() in extensions and name not in names:
                        names.append(name)
        return names

    def all(self) -> dict[str, list[str]]:
        """Every kind with the names it holds."""
        return {kind: self.list(kind) for kind in FOLDERS}

    def find(self, kind: str, name_or_path: str | Path) -> Path:
        """The file for a model name (with or without extension) or an existing path."""
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return path
        if path.is_absolute() or str(name_or_path).startswith((".", "~")):
            raise SdkitError(f"{path} does not exist" + (" as a file (it is a folder)." if path.exists() else "."),
                             fix="check the path, or give a model name from `python -m sdkit models`")
        wanted = str(name_or_path).replace("\\", "/")
        for folder in self.folders(kind):
            for candidate in (folder / wanted, *(folder / (wanted + ext) for ext in FOLDERS[kind][1])):
                if candidate.is_file():
                    return candidate
        bare = _bare(wanted)
        for folder in self.folders(kind):  # last try: same name ignoring case, extension and (for a bare name) subfolder
            for name in self.list(kind):
                candidate = _bare(name) if "/" in wanted else _bare(name).rsplit("/", 1)[-1]
                if candidate == bare and (folder / name).is_file():
                    return folder / name
        there = self.list(kind)
        where = ", ".join(str(f) for f in self.folders(kind)) or ", ".join(str(r) for r in self.roots)
        raise SdkitError(
            f"No {kind} model named {str(name_or_path)!r} (looked in {where}). "
            + (f"There: {', '.join(there)}." if there else f"There are no {kind} models there."),
            fix=f"use one of the names listed, a path to the file, or put the file into a {kind}/ folder",
        )


def find(kind: str, name_or_path: str | Path, *, root: str | Path | None = None) -> Path:
    """Find a model file of `kind` by name or path in the default (or given) roots."""
    return ModelPaths.from_root(root).find(kind, name_or_path)
