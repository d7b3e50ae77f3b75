"""Measure a shapes-world ControlNet: does the shape land where the control image says? (placement IoU)

The control region is the shape the control image was drawn from; the detected region is the largest shape the
detector (`sdkit.shapes.detect.shape_mask`) finds in the picture made. Their intersection over union is 1 when the
shape lands exactly there, near 0 when it lands elsewhere. The samples are held out: positions, sizes and looks drawn
from a seed training never used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdkit.shapes import data
from sdkit.shapes.controls import KINDS, LOG_NAME, NAME, control_image
from sdkit.shapes.detect import detect, shape_mask
from sdkit.shapes.train import RUNS

HELD_OUT_SEED = 7_777_777  # training batches use seeds 0 .. 2000 * 1_000_003: this one is never among them
SAMPLES = 32
CARD_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)


@dataclass
class Sample:
    """One held-out layout: the spec the control image is drawn from, and how it is drawn."""

    spec: data.ShapeSpec
    kind: str

    def control(self, *, size: int = 64) -> Image.Image:
        """The control image (white edges or silhouette on black)."""
        return control_image(self.spec, kind=self.kind, size=size)

    def region(self, *, size: int = 64) -> np.ndarray:
        """Where the control image says the shape goes (boolean mask)."""
        return data.mask(self.spec, size=size) >= 128

    def prompt(self) -> str:
        """The full caption of the spec (the prompt agrees with the control image)."""
        return data.format_caption(**self.spec.attributes())


def held_out(count: int = SAMPLES, *, seed: int = HELD_OUT_SEED) -> list[Sample]:
    """`count` layouts at random positions and sizes, half drawn as edges and half as silhouettes."""
    rng = np.random.default_rng(seed)
    return [Sample(spec=data.random_spec(rng), kind=KINDS[i % len(KINDS)]) for i in range(count)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _settings(sample: Sample, seed: int, *, model: str, weight: float, steps: int, start: float = 0.0,
              end: float = 1.0, prompt: str | None = None):
    """The run for one sample (no ControlNet at weight 0: the plain model, for the 'without' figure)."""
    from sdkit.controlnet import Unit
    from sdkit.generate import GenerationSettings

    units = (Unit(model=model, picture=sample.control(), weight=weight, start=start, end=end),) if weight else ()
    return GenerationSettings(prompt=prompt or sample.prompt(), seed=seed, steps=steps, width=64, height=64,
                              controlnets=units)


def placement(pipe, *, model: str = NAME, weights: tuple[float, ...] = CARD_WEIGHTS, count: int = SAMPLES,
              steps: int = 20, start: float = 0.0, end: float = 1.0, progress: bool = True) -> dict[float, float]:
    """Mean placement IoU over `count` held-out layouts (seeds 0..count-1) at each ControlNet weight."""
    from tqdm.auto import tqdm

    from sdkit.generate import generate

    samples = held_out(count)
    out = {}
    with tqdm(total=len(weights) * count, desc="placement IoU", disable=not progress) as bar:
        for weight in weights:
            scores = []
            for seed, sample in enumerate(samples):
                settings = _settings(sample, seed, model=model, weight=weight, steps=steps, start=start, end=end)
                scores.append(iou(sample.region(), shape_mask(generate(pipe, settings, progress=False)[0])))
                bar.update()
            out[weight] = float(np.mean(scores))
    return out


def disagreement(pipe, *, model: str = NAME, count: int = 16, steps: int = 20, weight: float = 1.0,
                 progress: bool = True) -> dict[str, float]:
    """When the prompt names another shape than the control image draws: how often each one wins, and the IoU."""
    from tqdm.auto import tqdm

    from sdkit.generate import generate

    followed = {"control": 0, "prompt": 0, "neither": 0}
    scores = []
    for seed, sample in enumerate(tqdm(held_out(count), desc="prompt vs control", disable=not progress)):
        other = data.SHAPES[(data.SHAPES.index(sample.spec.shape) + 1) % len(data.SHAPES)]
        prompt = data.format_caption(**{**sample.spec.attributes(), "shape": other})
        picture = generate(pipe, _settings(sample, seed, model=model, weight=weight, steps=steps, prompt=prompt),
                           progress=False)[0]
        seen = detect(picture).shape
        followed["control" if seen == sample.spec.shape else "prompt" if seen == other else "neither"] += 1
        scores.append(iou(sample.region(), shape_mask(picture)))
    return {**{k: v / count for k, v in followed.items()}, "iou": float(np.mean(scores))}


def model_card(*, runs: Path = RUNS, models: Path | None = None) -> Path:
    """Measure the bundled ControlNet on held-out layouts and write models/controlnet/shapes-v1-layout.md."""
    import torch

    from sdkit import controlnet, device, formats
    from sdkit.checkpoints import load
    from sdkit.shapes.addons import MODELS, _training
    from sdkit.shapes.train import BUNDLE

    models = models or MODELS
    path = models / "controlnet" / f"{NAME}.safetensors"
    pipe = load(BUNDLE)
    info = controlnet.describe(controlnet.load(path, pipe=pipe))
    scores = placement(pipe, model=str(path))
    late = placement(pipe, model=str(path), weights=(1.0,), start=0.5)[1.0]
    early = placement(pipe, model=str(path), weights=(1.0,), end=0.3)[1.0]
    fight = disagreement(pipe, model=str(path))
    t = _training(LOG_NAME, runs)
    machine = f"{device.report().cpu}, {torch.get_num_threads()} threads"
    rows = "\n".join(f"| {w:g} | {s:.2f} |" for w, s in scores.items())
    text = f"""# {NAME}

A ControlNet for shapes-v1: it puts the shape **where the control image says**, in the size it says. The control
image is white on black, as real ControlNets take it: the canny edges of a shape, or its filled silhouette (a
scribbled blob). It carries no colour, so colour and background come from the prompt. Made for notebook 05; loaded by
`sdkit.controlnet` like any ControlNet from civitai.

- file: `{path.name}`, {path.stat().st_size / 1024:.0f} KiB, sha256 `{formats.sha256(path)}`
- layout: lllyasviel's original single file (`control_model.*`: `input_hint_block`, `zero_convs`,
  `middle_block_out`), fp16, {info['parameters']:,} parameters: shapes-v1's UNet encoder (blocks {info['blocks']})
  plus a hint encoder of {info['hint channels']} channels that takes 64 px control images to the 16x16 latents
- trained by `python -m sdkit.shapes.controls all` (seeded, resumable): diffusers' `ControlNetModel.from_unet` on a
  frozen shapes-v1, the base model's noise-prediction loss, {t['steps']} steps x batch {t['batch']} of random layouts
  (half edges, half silhouettes) with the base world's captions (10% dropped to ""), lr {t['lr']}, final loss
  {t['loss']}, {t['minutes']:.1f} minutes on {machine}

## Measured effect

`python -m sdkit.shapes.controls card`: {SAMPLES} held-out layouts (random position and size, half edges, half
silhouettes), each with its full caption as the prompt, seeds 0-{SAMPLES - 1}, 20 steps, CFG 7, euler_a; mean
intersection-over-union of the control region and the shape the detector finds:

| ControlNet weight | placement IoU |
|---|---|
{rows}

Weight 0 is the model without the ControlNet: it puts the shape where its seed says. Guidance start 0.5 (on for the
second half of the steps only): IoU {late:.2f}; guidance end 0.3 (the first 30% only): {early:.2f}. Where a
shape goes is decided in the first, noisiest steps.

**Prompt against control** (16 layouts, the prompt names the next shape instead of the one drawn, weight 1): the
picture shows the control image's shape {fight['control']:.0%}, the prompt's {fight['prompt']:.0%}, neither
{fight['neither']:.0%}; placement IoU {fight['iou']:.2f}.
"""
    out = path.with_suffix(".md")
    out.write_text(text)
    return out
