"""Upscale models: enlarge a picture and add detail (ESRGAN, Real-ESRGAN compact, SwinIR, ... read by spandrel).

    model = upscale.load("4x_shapes_compact")      # models/upscale_models/<name>.pth|.safetensors, or a path
    big = upscale.upscale(model, picture)           # PIL in, PIL out: 512 px tiles with 32 px overlap, a progress bar
    upscale.upscale_file("cat.png", model)          # writes cat-4x_shapes_compact.png next to it, never over a file

spandrel (what ComfyUI uses) recognises the architecture from the tensor names and shapes. sdkit reads the file
itself first (safetensors, or a pickle through torch.load(weights_only=True) only) and hands spandrel the tensors,
so a file that would run code is refused before spandrel sees it. Big pictures are upscaled in tiles blended over
their overlap, as ComfyUI's tiled upscale does, so memory stays bounded; when a tile still does not fit, the tile
size is halved and the picture done again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdkit import formats
from sdkit.errors import SdkitError
from sdkit.paths import ModelPaths

TILE, OVERLAP = 512, 32  # input pixels per tile and overlap between tiles (ComfyUI's defaults)
MIN_TILE = 64  # below this, halving the tile on an out-of-memory error gives up
PURPOSES = ("SR", "Restoration")  # spandrel's purposes for a picture-in, picture-out model (not inpainting, not faces)


@dataclass
class Upscaler:
    """An upscale model file, read and built by spandrel."""

    name: str
    path: Path
    model: object  # spandrel.ImageModelDescriptor
    scale: int
    architecture: str


def _state(path: Path) -> dict:
    """The file's tensors, unwrapped as spandrel expects (`params_ema`, `module.` prefixes)."""
    from spandrel import canonicalize_state_dict

    state, _ = formats.read_tensors(path, nested=True)  # weights_only: a file that would run code is refused here
    return canonicalize_state_dict(state)


def _looks_like(names: list[str]) -> str:
    """What a file that is not an upscaler seems to be, from its tensor names."""
    from sdkit import vae

    if "encoder.conv_in.weight" in names and "decoder.conv_out.weight" in names:
        return "a VAE (it goes in models/vae)"
    what = vae._looks_like(names)
    return what if what != "none of the kinds sdkit knows" else "no model spandrel knows"


def _said(error: Exception) -> str:
    """spandrel's own words, when it gave any."""
    return f" (spandrel: {error})" if str(error) else ""


def load(name_or_path: str | Path, *, root: str | Path | None = None) -> Upscaler:
    """Read an upscale model by name (the upscale_models folder) or path; refuse anything that is not one."""
    from spandrel import MAIN_REGISTRY, ImageModelDescriptor, ModelLoader, UnsupportedModelError

    path = ModelPaths.from_root(root).find("upscale_models", name_or_path)
    state = {k: v for k, v in _state(path).items() if isinstance(v, torch.Tensor)}  # spandrel reads tensors only
    names = list(state)
    if not names:
        raise SdkitError(f"{path.name} holds no tensors.", fix="download the file again")
    try:
        descriptor = ModelLoader().load_from_state_dict(state)
    except UnsupportedModelError as error:  # spandrel's reason: no architecture's key pattern matched
        known = len(MAIN_REGISTRY.architectures())
        raise SdkitError(f"{path.name} is not an upscale model: none of spandrel's {known} architectures (ESRGAN, "
                         f"Real-ESRGAN compact, SwinIR, HAT, ...) recognises its tensor names{_said(error)}; it looks "
                         f"like {_looks_like(names)}; first tensor {names[0]!r}.",
                         fix="put ESRGAN/Real-ESRGAN/SwinIR/... .pth or .safetensors files in models/upscale_models, "
                             "and checkpoints, VAEs and LoRAs in their own folders") from None
    except Exception as error:  # an architecture's shape reading fails on a damaged file  # noqa: BLE001
        raise SdkitError(f"{path.name} looks like an upscale model but spandrel could not build it: "
                         f"{type(error).__name__}: {str(error)[:200]}",
                         fix="the file is damaged or of an unsupported variant; download it again") from None
    if not isinstance(descriptor, ImageModelDescriptor) or descriptor.purpose not in PURPOSES:
        raise SdkitError(f"{path.name} is a {descriptor.architecture.name} model for {descriptor.purpose}, "
                         f"not an upscaler.", fix="choose an upscale model (purpose SR) from models/upscale_models")
    dtype = _dtype(descriptor)
    descriptor.to(dtype)
    if dtype != torch.float32:  # oneDNN's fast layout for reduced-precision convolutions, as the VAE runs
        descriptor.model.to(memory_format=torch.channels_last)
    descriptor.eval()
    return Upscaler(name=path.stem, path=path, model=descriptor, scale=int(descriptor.scale),
                    architecture=descriptor.architecture.name)


def describe(chosen: Upscaler) -> dict:
    """What `python -m sdkit info` says about an upscale model file."""
    d = chosen.model
    return {"file": str(chosen.path), "type": "upscale model", "architecture": chosen.architecture,
            "scale": f"{chosen.scale}x", "purpose": d.purpose, "tags": [str(t) for t in d.tags],
            "parameters": sum(p.numel() for p in d.model.parameters())}


def _dtype(descriptor) -> torch.dtype:
    """The dtype this machine runs convolution networks in (the VAE's choice), where the model supports it."""
    from sdkit import device

    name = device.choose(device.report())["vae"].dtype
    if name == "bfloat16" and descriptor.supports_bfloat16:
        return torch.bfloat16
    if name == "float16" and descriptor.supports_half:
        return torch.float16
    return torch.float32


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles begin along one side: every `tile - overlap` pixels, as ComfyUI steps them, so neighbours share
    `overlap` pixels; the last tile is cut short at the edge (not shifted back over its neighbour)."""
    if length <= tile:
        return [0]
    return list(range(0, length - overlap, tile - overlap))


def _ramp(size: int, feather: int, *, left: bool, right: bool) -> np.ndarray:
    """Blending weights along one side of a tile: rising over `feather` pixels where a neighbour overlaps."""
    weights = np.ones(size, dtype=np.float32)
    ramp = (np.arange(feather, dtype=np.float32) + 1) / (feather + 1)
    if left and feather:
        weights[:feather] = np.minimum(weights[:feather], ramp)
    if right and feather:
        weights[-feather:] = np.minimum(weights[-feather:], ramp[::-1])
    return weights


def _tiled(chosen: Upscaler, pixels: torch.Tensor, *, tile: int, overlap: int, step: Callable[[], None]) -> np.ndarray:
    """Run the model tile by tile over (1, C, H, W) pixels in 0..1; blended output as (H', W', C) float32."""
    _, channels, height, width = pixels.shape
    s = chosen.scale
    out = np.zeros((height * s, width * s, chosen.model.output_channels), dtype=np.float32)
    weight = np.zeros((height * s, width * s, 1), dtype=np.float32)
    rows, cols = starts(height, tile, overlap), starts(width, tile, overlap)
    dtype = chosen.model.dtype
    for y in rows:
        for x in cols:
            h, w = min(tile, height - y), min(tile, width - x)
            with torch.inference_mode():
                piece = chosen.model(pixels[:, :, y:y + h, x:x + w].to(dtype)).float().clamp(0, 1)
            piece = piece[0].permute(1, 2, 0).numpy()
            feather = overlap * s // 2
            mask = np.outer(_ramp(h * s, feather, left=y > 0, right=y + h < height),
                            _ramp(w * s, feather, left=x > 0, right=x + w < width))[..., None]
            out[y * s:(y + h) * s, x * s:(x + w) * s] += piece * mask
            weight[y * s:(y + h) * s, x * s:(x + w) * s] += mask
            step()
    return out / weight


def shared_overlap(tile: int, overlap: int) -> int:
    """The overlap actually used: at most a quarter of the tile, so small tiles still move forward."""
    return min(overlap, tile // 4)


def tile_count(width: int, height: int, *, tile: int = TILE, overlap: int = OVERLAP) -> int:
    """How many tiles a picture of this size is cut into."""
    shared = shared_overlap(tile, overlap)
    return len(starts(height, tile, shared)) * len(starts(width, tile, shared))


def upscale(chosen: Upscaler, picture: Image.Image, *, tile: int = TILE, overlap: int = OVERLAP,
            progress: bool = True, notes: list[str] | None = None) -> Image.Image:
    """The picture enlarged `chosen.scale` times, in tiles of `tile` px with `overlap` px blended between them."""
    import warnings

    from tqdm.auto import tqdm

    if tile < MIN_TILE or overlap < 0:
        raise SdkitError(f"tile={tile}, overlap={overlap}: tiles must be at least {MIN_TILE} px and the overlap 0 or "
                         f"more.", fix=f"use tile={TILE}, overlap={OVERLAP} (ComfyUI's defaults)")
    warnings.filterwarnings("ignore", message="torch.meshgrid")  # inside spandrel's transformer models
    mode = "L" if chosen.model.input_channels == 1 else "RGB"
    array = np.asarray(picture.convert(mode), dtype=np.float32) / 255
    pixels = torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None]
    while True:
        shared = shared_overlap(tile, overlap)
        total = tile_count(picture.width, picture.height, tile=tile, overlap=overlap)
        bar = tqdm(total=total, desc=f"upscale {chosen.scale}x ({chosen.name})", unit="tile", disable=not progress,
                   leave=False)
        try:
            out = _tiled(chosen, pixels, tile=tile, overlap=shared, step=lambda: bar.update(1))
            break
        except MemoryError:
            size = f"{picture.width * chosen.scale}x{picture.height * chosen.scale}"
            raise SdkitError(f"a {size} picture does not fit in this machine's memory.",
                             fix="upscale a smaller picture, or crop it into parts") from None
        except RuntimeError as error:
            text = str(error).lower()
            reduced = chosen.model.dtype != torch.float32
            if reduced and any(w in text for w in ("dtype", "bfloat16", "half")):  # an architecture with fp32-only parts
                chosen.model.to(torch.float32)
                _note(notes, f"upscale: {chosen.architecture} does not run in reduced precision here; fp32 instead")
            elif "memory" in text and tile // 2 >= MIN_TILE:  # the allocator's "can't allocate memory"
                tile //= 2
                _note(notes, f"upscale: a tile did not fit in memory; tiles of {tile} px instead")
            else:
                raise
        finally:
            bar.close()
    result = (out * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(result[..., 0] if result.shape[-1] == 1 else result, mode=mode).convert("RGB")


def _note(notes: list[str] | None, text: str) -> None:
    """Tell the caller once what was done differently."""
    if notes is not None and text not in notes:
        notes.append(text)


def output_path(image: Path, chosen: Upscaler, *, out: Path | None = None) -> Path:
    """Where `upscale_file` writes: `out` (an error if it exists), or `<image>-<model>.png` next to the image, with
    -1, -2 ... rather than overwrite."""
    if out is not None:
        if out.suffix.lower() != ".png":
            raise SdkitError(f"{out}: sdkit saves PNG files only.", fix=f"use {out.with_suffix('.png').name}")
        if out.exists():
            raise SdkitError(f"{out} already exists; sdkit never overwrites an image.",
                             fix="choose another name or delete it yourself")
        return out
    target = image.with_name(f"{image.stem}-{chosen.name}.png")
    candidate, n = target, 1
    while candidate.exists():
        candidate = target.with_name(f"{target.stem}-{n}{target.suffix}")
        n += 1
    return candidate


def upscale_file(image: str | Path, chosen: Upscaler, *, out: str | Path | None = None, tile: int = TILE,
                 overlap: int = OVERLAP, progress: bool = True, notes: list[str] | None = None) -> Path:
    """Upscale an image file into a new PNG (never over an existing file), its A1111 text kept."""
    from sdkit.metadata import save_png

    source = Path(image)
    if not source.is_file():
        raise SdkitError(f"{source} does not exist.", fix="check the image path")
    try:
        picture = Image.open(source)
        picture.load()
    except (OSError, Image.DecompressionBombError) as error:
        raise SdkitError(f"{source} is not an image Pillow can read ({error}).", fix="give a PNG or JPEG") from None
    big = upscale(chosen, picture, tile=tile, overlap=overlap, progress=progress, notes=notes)
    # As A1111's Extras tab saves: the generation text unchanged, what was done after it in "postprocessing".
    texts = {"parameters": picture.info["parameters"]} if isinstance(picture.info.get("parameters"), str) else {}
    texts["postprocessing"] = f"Postprocess upscale by: {chosen.scale}, Postprocess upscaler: {chosen.name}"
    target = output_path(source, chosen, out=Path(out) if out else None)
    save_png(big, path=target, texts=texts)
    return target

