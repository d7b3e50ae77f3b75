"""Measured speed choices: which number format, and which way of running it (PyTorch in channels-last or contiguous
memory, or OpenVINO where it is installed), run this machine's UNet fastest, timed once on a UNet level with SD1.5's
first-level shapes and kept in a file, so later loads use the measured pick and `python -m sdkit device` says what
was measured.

The CPU's features give the first guess (`device.choose`: bf16 where AMX or AVX512-BF16 exist, PyTorch with
channels-last convolutions); a measurement replaces it only when another candidate is clearly faster here (MARGIN),
because a shared machine's timings jitter. `python -m sdkit device --measure` (run by `make lab`) measures and saves.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path

from sdkit.errors import SdkitError

LAYOUTS = ("channels_last", "contiguous")  # PyTorch's two memory layouts for convolutions
OPENVINO = "openvino"  # the third way: the UNet converted to OpenVINO (sdkit.openvino_unet), where it is installed
MARGIN = 1.10  # a candidate replaces the CPU-feature guess only when at least 10% faster in the measurement
LATENT = 64  # latent side of the timed call: SD1.5's 512² (and SDXL's largest attention at 1024²). At 256² PyTorch's
# overheads weigh more and the level misjudged the whole UNet: OpenVINO tied there, yet was 1.29x faster at 512²
VERSION = 1  # of the file's layout


def cache_file() -> Path:
    """Where the measurement is kept: $SDKIT_CACHE/speed.json (default ~/.cache/sdkit)."""
    return Path(os.environ.get("SDKIT_CACHE") or "~/.cache/sdkit").expanduser() / "speed.json"


def machine_key(report) -> str:
    """What a measurement belongs to: the CPU, the threads torch uses and torch's version."""
    import torch

    return f"{report.cpu} | {torch.get_num_threads()} threads | torch {report.torch_version}"


@dataclass(frozen=True)
class Measurement:
    """Seconds of one timed call per candidate ('bfloat16 channels_last', 'float32 openvino', ...), the best of its
    rounds: a candidate is a dtype and a way (a PyTorch layout, or OpenVINO)."""

    key: str
    day: str
    seconds: dict[str, float]
    version: int = VERSION

    def fastest(self) -> tuple[str, str]:
        """(dtype, way) of the fastest candidate."""
        dtype, way = min(self.seconds, key=self.seconds.__getitem__).split()
        return dtype, way

    def pick(self, *, dtype: str, way: str) -> tuple[str, str]:
        """The guess (dtype, way), or the fastest candidate where it beats the guess by MARGIN."""
        guess = self.seconds.get(f"{dtype} {way}")
        best = self.fastest()
        if guess is None or self.seconds[" ".join(best)] * MARGIN < guess:
            return best
        return dtype, way

    def only(self, *, dtype: str | None = None, ways: tuple[str, ...] | None = None) -> Measurement | None:
        """The candidates in this dtype and these ways (None: any), or None where none was timed."""
        seconds = {name: s for name, s in self.seconds.items()
                   if dtype in (None, name.split()[0]) and (ways is None or name.split()[1] in ways)}
        return replace(self, seconds=seconds) if seconds else None

    def choose(self, *, dtype: str, layout: str) -> tuple[str, str, str]:
        """(dtype, PyTorch layout, way) from the guess: the precision every part gets and the layout the UNet gets
        when PyTorch runs it, both from PyTorch's own times; then OpenVINO as the way where it beat that by MARGIN."""
        pytorch = self.only(ways=LAYOUTS)
        if pytorch is not None:
            dtype, layout = pytorch.pick(dtype=dtype, way=layout)
        _, way = (self.only(dtype=dtype) or self).pick(dtype=dtype, way=layout)
        return dtype, layout, way

    def describe(self, *, guess: tuple[str, str], picked: tuple[str, str]) -> str:
        """One line: what was measured, and whether the pick kept or changed the guess (dtype, way)."""
        times = ", ".join(f"{label(name)} {s:.2f} s" for name, s in sorted(self.seconds.items(), key=lambda i: i[1]))
        verdict = ("keeps that" if picked == guess else
                   f"so {label(' '.join(picked))} instead (the guess took over {MARGIN - 1:.0%} longer)")
        return (f"measured here on {self.day} (one SD1.5 first-level UNet call at {LATENT * 8}²: {times}); "
                f"{verdict}")


def label(name: str) -> str:
    """'bfloat16 channels_last' as a person reads it: 'bf16 channels-last'; 'float32 openvino': 'fp32 OpenVINO'."""
    return (name.replace("bfloat16", "bf16").replace("float32", "fp32").replace("_", "-")
            .replace(OPENVINO, "OpenVINO"))


def candidates(report) -> list[tuple[str, str]]:
    """(dtype, way) pairs worth timing here: bf16 only where the CPU has bf16 units (elsewhere it is emulated);
    OpenVINO only where it is installed."""
    from sdkit import openvino_unet

    dtypes = ["bfloat16", "float32"] if report.cpu_has_bf16 else ["float32"]
    ways = [*LAYOUTS, OPENVINO] if openvino_unet.installed() else list(LAYOUTS)
    return [(dtype, way) for dtype in dtypes for way in ways]


def _names(report) -> set[str]:
    """The candidates' names here, as the saved file keys them ('bfloat16 openvino', ...)."""
    return {f"{dtype} {way}" for dtype, way in candidates(report)}


def _level():
    """One UNet level at SD1.5's first-level widths (320 channels, 8 heads, CLIP-L context): the UNet's costliest."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=LATENT, block_out_channels=(320,), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                mid_block_type=None, cross_attention_dim=768, attention_head_dim=8).eval()


def measure(report=None, *, rounds: int = 3, progress: bool = True) -> Measurement:
    """Time every candidate, round by round (a slow spell falls on all alike), save and return the measurement."""
    import torch
    from diffusers.utils import logging
    from tqdm.auto import tqdm

    from sdkit import device

    report = report or device.report()
    if report.accelerator != "none":
        raise SdkitError(f"sdkit runs on the {report.accelerator} GPU here; the CPU measurement does not apply.",
                         fix="nothing to do: the GPU's precision is chosen by its features")
    level, pairs = _level(), candidates(report)
    formats = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    times: dict[str, list[float]] = {f"{dtype} {way}": [] for dtype, way in pairs}
    level_before = logging.get_verbosity()
    logging.set_verbosity_error()  # its note on casting a model with `to()` is about its own loaders
    try:
        engines = _openvino_engines(level, pairs)
        with torch.inference_mode(), tqdm(total=rounds * len(pairs), desc="measuring", disable=not progress) as bar:
            for round_ in range(rounds):
                for dtype, way in pairs:
                    kind = getattr(torch, dtype)
                    if way == OPENVINO:
                        model = engines[dtype]
                    else:
                        level = level.to(dtype=kind, memory_format=formats[way])
                        model = level
                    layout = formats.get(way, torch.contiguous_format)
                    sample = torch.randn(2, 4, LATENT, LATENT, dtype=kind).contiguous(memory_format=layout)
                    context, step = torch.randn(2, 77, 768, dtype=kind), torch.tensor([500.0])
                    if round_ == 0:  # the first call in a format picks kernels and allocates: not timed
                        model(sample, step, context)
                    started = time.perf_counter()
                    model(sample, step, context)
                    times[f"{dtype} {way}"].append(time.perf_counter() - started)
                    bar.update()
    finally:
        logging.set_verbosity(level_before)
    result = Measurement(key=machine_key(report), day=date.today().isoformat(),
                         seconds={name: round(min(t), 4) for name, t in times.items()})
    save(result)
    return result


def _openvino_engines(level, pairs: list[tuple[str, str]]) -> dict:
    """An OpenVINO engine per dtype that has an OpenVINO candidate, all from one conversion of the level."""
    from sdkit import openvino_unet

    dtypes = [dtype for dtype, way in pairs if way == OPENVINO]
    if not dtypes:
        return {}
    model = openvino_unet.convert(level)
    return {dtype: openvino_unet.Engine(level, dtype=dtype, model=model) for dtype in dtypes}


def save(measurement: Measurement) -> Path:
    """Write the measurement to cache_file() (a temporary file renamed over it, so a reader never sees half)."""
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(asdict(measurement), indent=2))
    partial.replace(path)
    return path


def complete(report) -> bool:
    """Whether the saved measurement timed every candidate there is here now (installing OpenVINO adds one)."""
    found = load(report)
    return found is not None and set(found.seconds) == _names(report)


def load(report) -> Measurement | None:
    """The saved measurement for this machine, or None (none yet, another machine's or torch's, or unreadable)."""
    path = cache_file()
    try:
        found = Measurement(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    usable = (found.version == VERSION and found.key == machine_key(report) and isinstance(found.seconds, dict)
              and found.seconds and set(found.seconds) <= _names(report)
              and all(isinstance(s, (int, float)) and s > 0 for s in found.seconds.values()))
    return found if usable else None
