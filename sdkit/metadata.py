"""A1111 'parameters' text: write it, read it back, and save PNGs that carry it, never overwriting."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings

A1111_SAMPLER_NAMES: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpm2": "DPM2",
    "dpm2_a": "DPM2 a",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "ddim": "DDIM",
    "plms": "PLMS",
    "unipc": "UniPC",
    "lcm": "LCM",
    "dpm_fast": "DPM fast",
    "dpm_adaptive": "DPM adaptive",
}

# sdkit's schedule names -> A1111's "Schedule type" text.
SCHEDULE_NAMES = {"karras": "Karras", "exponential": "Exponential", "beta": "Beta", "sgm_uniform": "SGM Uniform"}

# ComfyUI's sampler names that mean one of ours.
_SAMPLER_ALIASES = {
    "euler_ancestral": "euler_a",
    "dpm_2": "dpm2",
    "dpm_2_ancestral": "dpm2_a",
    "uni_pc": "unipc",
    "dpmpp_sde_gpu": "dpmpp_sde",
    "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
    "dpmpp_3m_sde_gpu": "dpmpp_3m_sde",
}

# A1111's own pattern for one `Key: value` item (modules/infotext_utils.py).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]*\w")
_NUMBERED = re.compile(r"(\d{5,})-")
_NEGATIVE = "Negative prompt:"
_EXAMPLE = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x512"


# --- text ---------------------------------------------------------------------------------------


def format_parameters(settings: GenerationSettings, *, model_hash: str = "", seed: int | None = None) -> str:
    """The A1111 'parameters' text for settings, byte for byte as A1111 writes it."""
    extra = {key: str(value) for key, value in settings.extra.items()}
    schedule = {"normal": extra.get("Schedule type"), **SCHEDULE_NAMES}.get(
        settings.scheduler, extra.get("Schedule type") or settings.scheduler.replace("_", " ").title()
    )
    fields: dict[str, object] = {
        "Steps": settings.steps,
        "Sampler": _sampler_display(settings),
        "Schedule type": schedule,
        "CFG scale": _number(settings.cfg),
        "Seed": settings.seed if seed is None else seed,
        "Size": f"{settings.width}x{settings.height}",
        "Model hash": model_hash or extra.get("Model hash") or None,
        "Model": settings.model or None,
        "Denoising strength": _number(settings.strength) if settings.init_image or settings.hires_scale > 1 else None,
        "Clip skip": settings.clip_skip if settings.clip_skip > 1 else None,
        "Hires upscale": _number(settings.hires_scale) if settings.hires_scale > 1 else None,
        "Hires steps": settings.hires_steps if settings.hires_scale > 1 and settings.hires_steps else None,
        "Hires upscaler": settings.hires_upscaler if settings.hires_scale > 1 else None,
        "DeepCache": settings.deep_cache if settings.deep_cache > 1 else None,  # sdkit's fast mode (sdkit.fast)
        "CFG until": _number(settings.cfg_until) if settings.cfg_until < 1 else None,
        "Token merging ratio": _number(settings.token_merging) if settings.token_merging > 0 else None,
    }
    for index, unit in enumerate(settings.controlnets):  # as A1111's ControlNet extension writes its units
        fields[f"ControlNet {index}"] = unit.describe(width=settings.width, height=settings.height)
    fields.update((key, value) for key, value in extra.items() if fields.get(key) is None)  # kept as it came
    line = ", ".join(f"{_checked_key(key)}: {_quote(str(value))}" for key, value in fields.items() if value is not None)
    negative = f"\n{_NEGATIVE} {settings.negative_prompt}" if settings.negative_prompt else ""
    return f"{settings.prompt}{negative}\n{line}".strip()


def parse_parameters(text: str) -> GenerationSettings:
    """GenerationSettings from A1111 'parameters' text (also what ComfyUI savers and others write)."""
    *lines, last = text.replace("\r\n", "\n").strip().split("\n")
    params = _split_params(last)
    if "Steps" not in params:
        raise SdkitError(
            f"this is not A1111 generation text: expected a last line like {_EXAMPLE!r}, got {last[:80]!r}.",
            fix="pass the 'parameters' text of an image made by A1111 or sdkit (read_parameters(path) reads it)",
        )
    prompt: list[str] = []
    negative: list[str] | None = None
    for line in lines:
        if negative is None and line.startswith(_NEGATIVE):
            negative = [line[len(_NEGATIVE) :].lstrip()]
        elif negative is None:
            prompt.append(line)
        else:
            negative.append(line)
    settings = GenerationSettings(prompt="\n".join(prompt), negative_prompt="\n".join(negative or []))
    for key, value in params.items():
        if key in _FIELDS:
            name, convert = _FIELDS[key]
            setattr(settings, name, convert(key, value))
        elif key == "Size":
            settings.width, settings.height = _to_size(value)
        elif key == "Sampler":
            settings.sampler, karras, known = _sampler_from_display(value)
            settings.scheduler = "karras" if karras else settings.scheduler
            if not known:
                settings.extra["Sampler"] = value
        elif key == "Schedule type" and _snake(value) != "automatic":
            # every named schedule is kept by name: generate() runs it, or refuses it by name; never a silent "normal"
            known = {_snake(display): name for name, display in SCHEDULE_NAMES.items()}
            settings.scheduler = known.get(_snake(value), _snake(value))
            if settings.scheduler not in SCHEDULE_NAMES:
                settings.extra[key] = value  # its own spelling, to write it back as it came
        elif key == "Schedule type":
            pass  # Automatic: the sampler's own schedule
        elif re.fullmatch(r"ControlNet \d+", key):
            from sdkit.controlnet import parse_unit

            settings.controlnets += (parse_unit(value),)
        else:
            settings.extra[key] = value
    return settings


def _split_params(line: str) -> dict[str, str]:
    """The `Key: value, ...` items of a line, json-quoted values unquoted."""
    params = {}
    for key, value in _PARAM.findall(line):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
        params[key.strip()] = value
    return params


def _quote(value: str) -> str:
    """A value as A1111 writes it: json-quoted when it holds a comma, colon, newline or quote."""
    if any(char in value for char in ',:\n"') or value != value.strip():
        return json.dumps(value, ensure_ascii=False)
    return value


def _checked_key(key: str) -> str:
    """key, if A1111 text can hold it."""
    if not _KEY.fullmatch(key):
        raise SdkitError(
            f"settings.extra key {key!r} can't be written as A1111 text: "
            "keys are letters, digits, spaces, '-' and '/'.",
            fix="rename the key, e.g. 'My note'",
        )
    return key


def _number(value: float) -> str:
    """A number as A1111 prints it: 7 -> '7', 7.5 -> '7.5'."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _snake(name: str) -> str:
    """A display name as a snake_case guess: 'DPM++ 2M SDE' -> 'dpmpp_2m_sde'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("++", "pp")).strip("_")


def _sampler_from_display(display: str) -> tuple[str, bool, bool]:
    """(sdkit sampler, karras?, known?) for an A1111, ComfyUI or sdkit sampler name."""
    name = _snake(display)
    karras = name.endswith("_karras")
    name = _SAMPLER_ALIASES.get(name.removesuffix("_karras"), name.removesuffix("_karras"))
    return name, karras, name in A1111_SAMPLER_NAMES


def _sampler_display(settings: GenerationSettings) -> str:
    """The A1111 name of settings.sampler; an unknown one keeps the name it was read with."""
    if settings.sampler in A1111_SAMPLER_NAMES:
        return A1111_SAMPLER_NAMES[settings.sampler]
    raw = str(settings.extra.get("Sampler", ""))
    if raw and _sampler_from_display(raw)[0] == settings.sampler:
        return re.sub(r"[ _]karras$", "", raw, flags=re.IGNORECASE)
    return settings.sampler


def _to_int(key: str, value: str) -> int:
    """value as an int, or an error naming key."""
    try:
        return int(value)
    except ValueError:
        raise SdkitError(f"'{key}: {value}' is not a whole number.", fix=f"write it like '{key}: 20'") from None


def _to_float(key: str, value: str) -> float:
    """value as a float, or an error naming key."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise SdkitError(f"'{key}: {value}' is not a number.", fix=f"write it like '{key}: 7.5'")
    return number


def _text(_key: str, value: str) -> str:
    """A text field as it came."""
    return value


# A1111's key -> (GenerationSettings field, converter) for the fields read one to one.
_FIELDS = {"Steps": ("steps", _to_int), "CFG scale": ("cfg", _to_float),
           "Seed": ("seed", _to_int), "Model": ("model", _text),
           "Clip skip": ("clip_skip", _to_int),
           "Denoising strength": ("strength", _to_float),
           "Hires upscale": ("hires_scale", _to_float),
           "Hires steps": ("hires_steps", _to_int), "Hires upscaler": ("hires_upscaler", _text),
           "DeepCache": ("deep_cache", _to_int), "CFG until": ("cfg_until", _to_float),
           "Token merging ratio": ("token_merging", _to_float)}


def _to_size(value: str) -> tuple[int, int]:
    """'512x768' -> (512, 768)."""
    match = re.fullmatch(r"(\d+)\s*x\s*(\d+)", value)
    if not match:
        raise SdkitError(f"'Size: {value}' is not WIDTHxHEIGHT.", fix="write it like 'Size: 512x768'")
    return int(match.group(1)), int(match.group(2))


# --- PNG files ----------------------------------------------------------------------------------


def read_parameters(path: str | os.PathLike[str]) -> GenerationSettings:
    """The settings stored in a PNG's 'parameters' text chunk (tEXt or iTXt)."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            chunks = dict(getattr(image, "text", None) or image.info)
    except FileNotFoundError:
        raise SdkitError(f"{path} does not exist.", fix="check the file name and folder") from None
    except UnidentifiedImageError:
        raise SdkitError(f"{path} is not an image.", fix="pass a PNG saved by A1111 or sdkit") from None
    except OSError as error:
        raise SdkitError(f"{path} could not be read as a PNG ({error}).", fix="pass a complete PNG file") from None
    text = chunks.get("parameters")
    if not isinstance(text, str) or not text.strip():
        found = ", ".join(sorted(key for key, value in chunks.items() if isinstance(value, str))) or "none"
        comfy = " ComfyUI stores its node graph ('prompt'/'workflow'), not A1111 text." if "workflow" in chunks else ""
        raise SdkitError(
            f"{path} has no 'parameters' text chunk (text chunks found: {found}).{comfy}",
            fix="use an image saved by A1111, sdkit's save_image, or a ComfyUI node that writes A1111 parameters",
        )
    try:
        return parse_parameters(text)
    except SdkitError as error:
        raise SdkitError(f"{path}: {error.message}", fix=error.fix) from None


def next_image_number(folder: str | os.PathLike[str]) -> int:
    """1 + the highest 'NNNNN-' prefix among folder's files, 0 if none (A1111's numbering)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    numbers = [int(match.group(1)) for name in os.listdir(folder) if (match := _NUMBERED.match(name))]
    return max(numbers, default=-1) + 1


def save_image(
    image: Image.Image,
    *,
    settings: GenerationSettings,
    out_dir: str | os.PathLike[str],
    seed: int | None = None,
    model_hash: str = "",
) -> Path:
    """Save image as out_dir/NNNNN-<seed>.png with its parameters; never replaces an existing file."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SdkitError(f"{out_dir} is a file, not a folder for images.", fix="choose a folder for --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = settings.seed if seed is None else seed
    data = _png_bytes(image, settings=settings, seed=seed, model_hash=model_hash)
    with _temp_file(out_dir, data) as temp:
        number = next_image_number(out_dir)
        while not _claim(temp, target := out_dir / f"{number:05}-{seed}.png", data):
            number = max(number + 1, next_image_number(out_dir))  # taken meanwhile: the next free one
    return target


def save_image_as(
    image: Image.Image,
    *,
    path: str | os.PathLike[str],
    settings: GenerationSettings,
    seed: int | None = None,
    model_hash: str = "",
) -> Path:
    """Save image at exactly path with its parameters; an error if path exists."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SdkitError(f"{path}: sdkit saves PNG files only (the parameters live in a PNG text chunk).",
                         fix=f"use {path.with_suffix('.png').name}")
    if os.path.lexists(path):
        raise _exists_error(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _png_bytes(image, settings=settings, seed=settings.seed if seed is None else seed, model_hash=model_hash)
    with _temp_file(path.parent, data) as temp:
        if not _claim(temp, path, data):
            raise _exists_error(path)
    return path


def save_png(image: Image.Image, *, path: str | os.PathLike[str], texts: dict[str, str]) -> Path:
    """Save image at exactly path with these PNG text chunks (e.g. `parameters`), atomically; an error if path
    exists."""
    path = Path(path)
    if os.path.lexists(path):
        raise _exists_error(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _encode(image, texts)
    with _temp_file(path.parent, data) as temp:
        if not _claim(temp, path, data):
            raise _exists_error(path)
    return path


def _exists_error(path: Path) -> SdkitError:
    """The error for a target that is already there."""
    return SdkitError(f"{path} already exists; sdkit never overwrites an image.",
                      fix="choose another name or delete it yourself")


def _png_bytes(image: Image.Image, *, settings: GenerationSettings, seed: int, model_hash: str) -> bytes:
    """image encoded as PNG with the 'parameters' chunk."""
    return _encode(image, {"parameters": format_parameters(settings, model_hash=model_hash, seed=seed)})


def _encode(image: Image.Image, texts: dict[str, str]) -> bytes:
    """image encoded as PNG with these text chunks."""
    if not isinstance(image, Image.Image):
        raise SdkitError(f"expected a PIL image, got {type(image).__name__}.",
                         fix="convert it first, e.g. PIL.Image.fromarray(array)")
    info = PngInfo()
    for key, text in texts.items():
        info.add_text(key, text)  # iTXt if not latin-1
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


@contextlib.contextmanager
def _temp_file(folder: Path, data: bytes) -> Iterator[Path]:
    """A hidden file in folder holding data, removed on exit."""
    while not _write_new(temp := folder / f".sdkit-{secrets.token_hex(8)}.png.tmp", data):
        pass
    try:
        yield temp
    finally:
        temp.unlink(missing_ok=True)


def _write_new(path: Path, data: bytes) -> bool:
    """Create path holding data; False, touching nothing, if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


def _claim(temp: Path, target: Path, data: bytes) -> bool:
    """Give the complete temp file the name target unless that exists (then False)."""
    try:
        os.link(temp, target)  # atomic, and refuses an existing name
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (FAT, some network drives): exclusive create instead
        return _write_new(target, data)
