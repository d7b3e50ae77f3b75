"""Train the shapes world's upscaler on this CPU: python -m sdkit.shapes.upscalers {train,card,all}.

`4x_shapes_compact`: Real-ESRGAN's compact architecture (SRVGGNetCompact, as spandrel builds it) trained to undo a
4x bicubic shrink of shapes-world pictures: shapes of every colour, style and angle drawn at 256 px, 128 px crops of
them shrunk to 32. The loss is MSE (what PSNR measures): with L1, Real-ESRGAN's pixel loss, this small network settled
on the nearest-neighbour answer (residual 0, 2.3 dB under bicubic after 2000 steps), since L1's best guess for an
edge pixel it is unsure of is "no change".
Written in the layout Real-ESRGAN's own `realesr-general-x4v3.pth` uses (`body.N.weight`), so `sdkit.upscale`
and ComfyUI load it through spandrel like any downloaded compact model. Seeded and resumable like every
shapes-world training script (sdkit.shapes.train.fit).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdkit.shapes import data
from sdkit.shapes.addons import MODELS, _atomic_save, _training
from sdkit.shapes.train import RUNS, Plan, command_line, fit

NAME = "4x_shapes_compact"
SCALE, FEATURES, CONVS = 4, 32, 8  # realesr-general-x4v3 is 64 features x 32 convs; the shapes world needs less
PATCH, DRAWN = 128, 256  # training crops of pictures drawn at the held-out size; the network sees them shrunk to 32
HELD_OUT_SEED, HELD_OUT_SIZE = 90_000, 256  # the measurement's pictures: 64 px (what shapes-v1 makes) -> 256
PLANS = {"train": Plan(steps=2000, batch=32, lr=1e-3, save_every=100, warmup=50)}


def random_picture(rng: np.random.Generator, *, size: int) -> Image.Image:
    """A shapes-world picture with everything the world can draw: any colour, style, angle and the star."""
    spec = data.random_spec(rng)
    spec.colour = str(rng.choice(list(data.COLOURS) + list(data.EXTRA_COLOURS)))
    spec.shape = str(rng.choice(list(data.SHAPES) + list(data.EXTRA_SHAPES)))
    spec.style = str(rng.choice(data.STYLES))
    spec.rotation = float(rng.uniform(0, 360)) if rng.random() < 0.5 else 0.0
    return data.draw(spec, size=size)


def shrink(picture: Image.Image, *, scale: int = SCALE) -> Image.Image:
    """The low-resolution input: PIL's bicubic (antialiased) shrink by `scale`."""
    return picture.resize((picture.width // scale, picture.height // scale), Image.Resampling.BICUBIC)


def bicubic(picture: Image.Image, *, scale: int = SCALE) -> Image.Image:
    """The baseline an upscaler must beat: PIL's bicubic enlargement by `scale`."""
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.BICUBIC)


def _tensor(pictures: list[Image.Image]) -> torch.Tensor:
    """RGB pictures as a (N, 3, H, W) float batch in 0..1, as spandrel's models take them."""
    return torch.from_numpy(np.stack([np.asarray(p) for p in pictures])).permute(0, 3, 1, 2).float() / 255


def build() -> torch.nn.Module:
    """A fresh SRVGGNetCompact from spandrel's own architecture code."""
    from spandrel.architectures.Compact import Compact

    return Compact(num_in_ch=3, num_out_ch=3, num_feat=FEATURES, num_conv=CONVS, upscale=SCALE, act_type="prelu")


class UpscaleTask(torch.nn.Module):
    """The compact network learning to enlarge shrunk shapes-world pictures back to their originals."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build()

    def loss(self, step: int, plan: Plan) -> torch.Tensor:
        """MSE to the original crop, on a seeded batch of random crops of drawn pictures."""
        rng = np.random.default_rng(plan.seed * 1_000_003 + step)
        originals = []
        for _ in range(plan.batch):
            x, y = (int(v) for v in rng.integers(0, DRAWN - PATCH + 1, 2))
            originals.append(random_picture(rng, size=DRAWN).crop((x, y, x + PATCH, y + PATCH)))
        small, target = _tensor([shrink(p) for p in originals]), _tensor(originals)
        return F.mse_loss(self.net(small), target)


def train(*, runs: Path = RUNS, steps: int | None = None, models: Path = MODELS) -> Path:
    """Train (or resume) the upscaler; returns the file written under models/upscale_models/."""
    from safetensors.torch import save_file

    plan = Plan(**{**asdict(PLANS["train"]), "steps": steps or PLANS["train"].steps})
    torch.manual_seed(plan.seed)
    task = UpscaleTask()
    fit(task, plan, name=NAME, runs=runs)
    tensors = {k: v.detach().contiguous() for k, v in task.net.state_dict().items()}
    return _atomic_save(tensors, models / "upscale_models" / f"{NAME}.safetensors", None, save_file)


def held_out(count: int = 32) -> list[Image.Image]:
    """The measurement's reference pictures (256 px), never drawn in training (their own seed range)."""
    rng = np.random.default_rng(HELD_OUT_SEED)
    return [random_picture(rng, size=HELD_OUT_SIZE) for _ in range(count)]


def measure(*, count: int = 32, models: Path = MODELS) -> dict:
    """The bundled upscaler against bicubic on `count` held-out pictures shrunk to 64 px: mean PSNR and SSIM."""
    from sdkit import quality, upscale

    model = upscale.load(models / "upscale_models" / f"{NAME}.safetensors")
    rows = []
    for reference in held_out(count):
        small = shrink(reference)
        mine, base = upscale.upscale(model, small, progress=False), bicubic(small)
        rows.append((quality.psnr(mine, reference), quality.psnr(base, reference),
                     quality.ssim(mine, reference), quality.ssim(base, reference)))
    psnr_model, psnr_bicubic, ssim_model, ssim_bicubic = (float(np.mean(c)) for c in zip(*rows))
    return {"count": count, "psnr_model": psnr_model, "psnr_bicubic": psnr_bicubic, "ssim_model": ssim_model,
            "ssim_bicubic": ssim_bicubic, "gain_db": psnr_model - psnr_bicubic,
            "wins": sum(r[0] > r[1] for r in rows)}


def model_card(*, runs: Path = RUNS, models: Path = MODELS) -> Path:
    """Measure the upscaler and write its model card next to it."""
    from sdkit import device, formats

    m, t = measure(models=models), _training(NAME, runs)
    path = models / "upscale_models" / f"{NAME}.safetensors"
    card = f"""# {NAME}

A 4x upscaler for the shapes world: Real-ESRGAN's compact architecture (SRVGGNetCompact: {FEATURES} features,
{CONVS} convolutions, PReLU, pixel shuffle; `realesr-general-x4v3.pth` is the same design at 64 x 32), loaded through
spandrel like any upscaler in ComfyUI's `upscale_models` or A1111's `models/ESRGAN` folder. Made for notebook 07.

- file: `{path.name}`, {path.stat().st_size / 1024:.0f} KiB, {t['parameters']:,} parameters, sha256 `{formats.sha256(path)}`
- trained by `python -m sdkit.shapes.upscalers train` (seeded, resumable): {t['steps']} steps x batch {t['batch']}
  of {PATCH} px crops of {DRAWN} px shapes-world pictures (every colour including purple, fill/outline/stripes, half
  of them rotated, stars too), shrunk 4x with PIL's bicubic; MSE loss (L1 settled on the nearest-neighbour answer,
  2.3 dB under bicubic), lr {t['lr']}, final loss {t['loss']},
  {t['minutes']:.1f} minutes on {device.report().cpu}, {torch.get_num_threads()} threads

## Measured

`python -m sdkit.shapes.upscalers card`: {m['count']} held-out pictures ({HELD_OUT_SIZE} px, seeds never used in
training) shrunk to {HELD_OUT_SIZE // SCALE} px and enlarged back 4x:

| | PSNR | SSIM |
|---|---|---|
| bicubic (PIL) | {m['psnr_bicubic']:.2f} dB | {m['ssim_bicubic']:.3f} |
| {NAME} | {m['psnr_model']:.2f} dB | {m['ssim_model']:.3f} |

{m['gain_db']:+.2f} dB over bicubic on average; better on {m['wins']} of {m['count']} pictures. SSIM tells another story
({m['ssim_model'] - m['ssim_bicubic']:+.3f}): the model leaves faint noise of 1 level in about a tenth of the flat background
(bicubic leaves it exactly flat), which SSIM weighs heavily in flat areas, while its edges are far closer to the
truth, which PSNR weighs. It knows only flat shapes on plain backgrounds: on a photo it sharpens edges and paints
texture flat.
"""
    out = path.with_suffix(".md")
    out.write_text(card)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: train the upscaler and/or write its card."""
    args = command_line("sdkit.shapes.upscalers", ["train", "card", "all"], argv, models=MODELS)
    if args.part in ("train", "all"):
        print(train(runs=args.runs, steps=args.steps, models=args.models))
    if args.part in ("card", "all"):
        print(model_card(runs=args.runs, models=args.models))


if __name__ == "__main__":
    main()
