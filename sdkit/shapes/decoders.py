"""Train shapes-v1's other decoders on this CPU: python -m sdkit.shapes.decoders {tiny,warm,card,all}.

`taesd_shapes_decoder`: TAESD's architecture (diffusers' AutoencoderTiny decoder) distilled from shapes-v1's own
VAE decoder, written in TAESD's numbered single-file layout as ComfyUI's vae_approx folder keeps it. The panel's
live preview uses it, and `vae.apply` can use it as a fast final decode. Seeded and resumable like every
shapes-world training script (sdkit.shapes.train.fit).

`shapes-v1-warm`: an alternative full VAE for shapes-v1, in the single-file layout VAE downloads use
(`encoder.down.0.block.0...`, as vae-ft-mse-840000-ema-pruned.safetensors). Its encoder is shapes-v1's own, so it
reads the same latents; its decoder was fine-tuned to paint them with a warm colour grade (`warm()`: white becomes
cream, black a dark brown), as real alternative VAEs change saturation, contrast and fine detail.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdkit.shapes import data
from sdkit.shapes.addons import MODELS, base_parts
from sdkit.shapes.train import RUNS, Plan, command_line, fit

TINY_NAME, WARM_NAME = "taesd_shapes_decoder", "shapes-v1-warm"
TINY_WIDTH, TINY_BLOCKS = 16, (2, 2, 1)  # 3 groups = 2 upsamplings: shapes-v1's VAE is 4x, not SD's 8x
PLANS = {"tiny": Plan(steps=1500, batch=32, lr=2e-3, save_every=100, warmup=50),
         "warm": Plan(steps=600, batch=16, lr=5e-4, save_every=100, warmup=50)}
# The warm grade per channel, on 0..255: out = gain * in + lift (a film-like look; the VAE check still accepts it).
WARM_GAIN, WARM_LIFT = (0.90, 0.95, 0.84), (24.0, 8.0, 0.0)


def warm(pixels: torch.Tensor) -> torch.Tensor:
    """The warm grade of pictures in [-1, 1] (N, 3, H, W), as the warm VAE learns to paint them."""
    gain = torch.tensor(WARM_GAIN).view(1, 3, 1, 1)
    lift = torch.tensor(WARM_LIFT).view(1, 3, 1, 1) / 127.5
    return (pixels + 1) * gain - 1 + lift


def _pictures(rng: np.random.Generator, count: int) -> torch.Tensor:
    """`count` seeded shapes-world pictures (a third outlined, as the outlines LoRA draws) in [-1, 1]."""
    pictures = []
    for _ in range(count):
        spec = data.random_spec(rng)
        spec.style = ("fill", "fill", "outline")[int(rng.integers(3))]
        pictures.append(np.asarray(data.draw(spec)))
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1


class TinyTask(torch.nn.Module):
    """A TAESD decoder learning to turn shapes-v1's latents into what its VAE decoder makes of them."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers import AutoencoderTiny

        _, self.vae, _, _, _ = base_parts()
        groups = len(TINY_BLOCKS)
        self.tiny = AutoencoderTiny(latent_channels=4, decoder_block_out_channels=[TINY_WIDTH] * groups,
                                    num_decoder_blocks=list(TINY_BLOCKS), encoder_block_out_channels=[TINY_WIDTH] * groups,
                                    num_encoder_blocks=[1] * groups)
        self.tiny.encoder = None  # decode only, as TAESD's decoder files are

    def pair(self, step: int, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded latents (as the UNet makes them) and the VAE's decode of them."""
        pixels = _pictures(np.random.default_rng(plan.seed * 1_000_003 + step), plan.batch)
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(step))
            target = self.vae.decode(latents).sample
        return latents * self.vae.config.scaling_factor, target

    def loss(self, step: int, plan: Plan) -> torch.Tensor:
        """L1 + MSE to the full decoder's picture."""
        latents, target = self.pair(step, plan)
        out = self.tiny.decode(latents).sample
        return F.l1_loss(out, target) + F.mse_loss(out, target)


class WarmTask(torch.nn.Module):
    """shapes-v1's VAE with its decoder learning the warm grade; the encoder (the latent language) stays frozen."""

    def __init__(self) -> None:
        super().__init__()
        _, self.vae, _, _, _ = base_parts()
        self.vae.decoder.requires_grad_(True)
        self.vae.post_quant_conv.requires_grad_(True)

    def loss(self, step: int, plan: Plan) -> torch.Tensor:
        """L1 + MSE between the decode of a picture's latents and the warm grade of the picture."""
        pixels = _pictures(np.random.default_rng(plan.seed * 1_000_003 + step), plan.batch)
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(step))
        out, target = self.vae.decode(latents).sample, warm(pixels)
        return F.l1_loss(out, target) + F.mse_loss(out, target)


def train_warm(*, runs: Path = RUNS, steps: int | None = None, models: Path = MODELS) -> Path:
    """Train (or resume) the warm VAE; returns the file written under models/vae/ (original single-file layout)."""
    from safetensors.torch import save_file

    from sdkit.convert import vae_to_ldm
    from sdkit.shapes.addons import _atomic_save

    plan = Plan(**{**asdict(PLANS["warm"]), "steps": steps or PLANS["warm"].steps})
    torch.manual_seed(plan.seed)
    task = WarmTask()
    fit(task, plan, name=WARM_NAME, runs=runs)
    ldm = vae_to_ldm(task.vae.state_dict(), num_blocks=len(task.vae.config.block_out_channels))
    tensors = {k.removeprefix("first_stage_model."): v.detach().contiguous() for k, v in ldm.items()}
    metadata = {"modelspec.architecture": "sdkit-shapes-v1/vae", "modelspec.title": WARM_NAME,
                "modelspec.description": "shapes-v1's VAE with a decoder fine-tuned to a warm colour grade"}
    return _atomic_save(tensors, models / "vae" / f"{WARM_NAME}.safetensors", metadata, save_file)


def train(*, runs: Path = RUNS, steps: int | None = None, models: Path = MODELS) -> Path:
    """Train (or resume) the tiny decoder; returns the file written under models/vae_approx/."""
    from safetensors.torch import save_file

    plan = Plan(**{**asdict(PLANS["tiny"]), "steps": steps or PLANS["tiny"].steps})
    torch.manual_seed(plan.seed)
    task = TinyTask()
    task.vae.requires_grad_(False)
    fit(task, plan, name=TINY_NAME, runs=runs)
    layers = {k.removeprefix("layers."): v for k, v in task.tiny.decoder.state_dict().items()}
    numbered = {f"{int(k.split('.')[0]) + 1}.{k.split('.', 1)[1]}": v.detach().contiguous()  # TAESD: 0 is the Clamp
                for k, v in layers.items()}
    out = models / "vae_approx" / f"{TINY_NAME}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(numbered, str(tmp))
    os.replace(tmp, out)
    return out


def measure(*, samples: int = 16, size: int = 512, repeats: int = 3, models: Path = MODELS) -> dict:
    """The tiny decoder against shapes-v1's VAE: colour error and detector agreement on `samples` generated
    pictures (64 px, the model's size), and decode seconds for one `size`² picture (median of `repeats`)."""
    import time

    from sdkit import vae as vaes
    from sdkit.checkpoints import load
    from sdkit.generate import generate
    from sdkit.shapes.detect import detect
    from sdkit.shapes.evaluate import DEFAULTS, addon_prompts
    from sdkit.shapes.train import BUNDLE

    pipe = load(BUNDLE)
    tiny = vaes.load(models / "vae_approx" / f"{TINY_NAME}.safetensors")
    tiny.model = vaes._prepared(tiny.model)  # as the preview and vae.apply run it
    own = vaes.original(pipe)
    errors, agree = [], 0
    for seed, prompt in enumerate(addon_prompts(samples)):
        final = []
        image = generate(pipe, DEFAULTS.replace(prompt=prompt, seed=seed), progress=False,
                         on_step=lambda done, total, latents, _x0: final.append(latents) if done == total else None)[0]
        with torch.inference_mode():
            fast = tiny.model.decode(final[-1].to(tiny.model.dtype)).sample[0].float()
        fast = ((fast.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).to(torch.uint8).numpy()
        full = np.asarray(image)
        errors.append(float(np.abs(fast.astype(int) - full.astype(int)).mean()))
        a, b = detect(full), detect(fast)
        agree += (a.colour, a.shape, a.background) == (b.colour, b.shape, b.background)
    latents = torch.randn(1, 4, size // 4, size // 4, generator=torch.Generator().manual_seed(0))
    timings = {}
    for name, decoder in (("vae", own), ("tiny", tiny.model)):
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.inference_mode():
                decoder.decode(latents.to(decoder.dtype) / getattr(decoder.config, "scaling_factor", 1.0))
            runs.append(time.perf_counter() - start)
        timings[name] = float(np.median(runs))
    return {"samples": samples, "mean_abs_error": float(np.mean(errors)), "detector_agrees": agree / samples,
            "size": size, "vae_s": timings["vae"], "tiny_s": timings["tiny"], "speedup": timings["vae"] / timings["tiny"],
            "vae_dtype": str(own.dtype).removeprefix("torch.")}


def model_card(*, runs: Path = RUNS, models: Path = MODELS) -> Path:
    """Measure the tiny decoder and write its model card next to it."""
    from sdkit import device, formats
    from sdkit.shapes.addons import _training

    m, t = measure(models=models), _training(TINY_NAME, runs)
    path = models / "vae_approx" / f"{TINY_NAME}.safetensors"
    card = f"""# {TINY_NAME}

A tiny decoder for shapes-v1: TAESD's architecture (diffusers' `AutoencoderTiny` decoder: {TINY_WIDTH} channels,
blocks {list(TINY_BLOCKS)}, 2 upsamplings for this 4x VAE), distilled from shapes-v1's own VAE decoder. The panel's
live preview uses it (it is found by name in `vae_approx`, like ComfyUI's `taesd_decoder`), and `vae.apply` can
make it the final decoder. Written in TAESD's own numbered layout (index 0 is the clamp), as `taesd_decoder.pth`.

- file: `{path.name}`, {path.stat().st_size / 1024:.0f} KiB, {t['parameters']:,} parameters, sha256 `{formats.sha256(path)}`
- trained by `python -m sdkit.shapes.decoders tiny` (seeded, resumable): {t['steps']} steps x batch {t['batch']} of
  shapes-world pictures (a third of them outlined), encoded by shapes-v1's VAE; target: its decoder's picture of the
  same latents; L1 + MSE, lr {t['lr']}, final loss {t['loss']}, {t['minutes']:.1f} minutes on {device.report().cpu},
  {torch.get_num_threads()} threads

## Measured

`python -m sdkit.shapes.decoders card`, on {device.report().cpu}:

- on {m['samples']} generated pictures (the add-on prompts, seeds 0-{m['samples'] - 1}, 20 steps, 64 px): mean
  colour error {m['mean_abs_error']:.1f} of 255 per channel against the full VAE's picture; the shapes detector sees the
  same colour, shape and background in {m['detector_agrees']:.0%} of them
- one {m['size']}² decode, median of 3: full VAE {m['vae_s']:.2f} s, tiny decoder {m['tiny_s']:.3f} s (both
  {m['vae_dtype']}, channels-last as this machine runs them): {m['speedup']:.1f}x faster
"""
    out = path.with_suffix(".md")
    out.write_text(card)
    return out


COMPARE_SEED = 70_000  # the comparison's pictures: a seed range no training batch uses


def reference_pictures(count: int = 16) -> list:
    """`count` drawn shapes-world pictures (a third outlined): the truth every decoder is measured against."""
    from PIL import Image

    pixels = _pictures(np.random.default_rng(COMPARE_SEED), count)
    arrays = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


def compare(pipe, decoders: dict, *, count: int = 16, size: int = 512, repeats: int = 3) -> dict:
    """The same latents (drawn pictures encoded by the checkpoint's VAE) through each decoder (name -> a loaded
    `vae.Vae`, or None for the checkpoint's own): mean colour error against the drawn pictures, the mean shift of
    each channel, how often the detector reads the same colour, shape and background as in the drawing, and the
    seconds of one size² decode (median of `repeats`). Nothing is applied to the pipeline."""
    import time

    from sdkit import quality
    from sdkit import vae as vaes
    from sdkit.shapes.detect import detect

    references = reference_pictures(count)
    latents = vaes.encode(pipe, references)
    big = torch.randn(1, 4, size // 4, size // 4, generator=torch.Generator().manual_seed(0))
    rows = {}
    for name, chosen in decoders.items():
        pictures = vaes.decode_with(pipe, chosen, latents)
        shift = np.mean([np.asarray(p, dtype=float).mean((0, 1)) - np.asarray(r, dtype=float).mean((0, 1))
                         for p, r in zip(pictures, references)], axis=0)
        same = sum((a.colour, a.shape, a.background) == (b.colour, b.shape, b.background)
                   for a, b in ((detect(p), detect(r)) for p, r in zip(pictures, references)))
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            vaes.decode_with(pipe, chosen, big)
            runs.append(time.perf_counter() - start)
        rows[name] = {"pictures": pictures, "colour_error": float(np.mean([quality.colour_error(p, r)
                                                                           for p, r in zip(pictures, references)])),
                      "shift_rgb": [float(x) for x in shift], "detector_same": same / count,
                      "seconds": float(np.median(runs))}
    return {"references": references, "size": size, "rows": rows}


def warm_card(*, runs: Path = RUNS, models: Path = MODELS) -> Path:
    """Measure the warm VAE against shapes-v1's own and write its model card next to it."""
    from sdkit import device, formats
    from sdkit import vae as vaes
    from sdkit.checkpoints import load
    from sdkit.shapes.addons import _training
    from sdkit.shapes.train import BUNDLE

    path = models / "vae" / f"{WARM_NAME}.safetensors"
    pipe = load(BUNDLE)
    chosen = vaes.load(path)
    score = vaes.check(pipe, chosen)
    result = compare(pipe, {"shapes-v1's own VAE": None, WARM_NAME: chosen})
    t = _training(WARM_NAME, runs)
    rows = "\n".join(f"| {name} | {r['colour_error']:.1f} | {r['shift_rgb'][0]:+.1f} / {r['shift_rgb'][1]:+.1f} / "
                     f"{r['shift_rgb'][2]:+.1f} | {r['detector_same']:.0%} | {r['seconds']:.3f} s |"
                     for name, r in result["rows"].items())
    card = f"""# {WARM_NAME}

An alternative VAE for shapes-v1: the same encoder (so the same latents), its decoder fine-tuned to paint them with a
**warm colour grade**: white becomes cream, black a dark brown, blue a little duller. Made for notebook 06, to show
that the VAE decides the final colours. Real alternative VAEs do the same kind of thing: a checkpoint with a washed-out
VAE looks grey, and a VAE like vae-ft-mse-840000 changes the fine detail.

- file: `{path.name}`, {path.stat().st_size / 1024:.0f} KiB, sha256 `{formats.sha256(path)}`; the single-file layout VAE
  downloads use (`encoder.down.0.block.0...`, no prefix), with `modelspec.architecture = sdkit-shapes-v1/vae` in its
  metadata (the shapes world's VAEs use 4 normalisation groups, which no tensor shape shows)
- the grade it learned, per channel on 0..255: out = gain x in + lift, gain {WARM_GAIN}, lift {WARM_LIFT}
- trained by `python -m sdkit.shapes.decoders warm` (seeded, resumable): {t['steps']} steps x batch {t['batch']}
  of shapes-world pictures (a third outlined), encoded by shapes-v1's frozen encoder; target: the warm grade of the
  picture; L1 + MSE on the decoder and post-quant convolution only ({t['parameters']:,} parameters), lr {t['lr']},
  final loss {t['loss']}, {t['minutes']:.1f} minutes on {device.report().cpu}, {torch.get_num_threads()} threads

## Measured

`python -m sdkit.shapes.decoders card`: {len(result['references'])} drawn pictures, encoded by shapes-v1's VAE,
decoded by each VAE; colour error is the mean |difference| per channel against the drawing (0..255), shift the mean
change of red / green / blue, "detector" how often it reads the drawing's colour, shape and background:

| VAE | colour error | shift R / G / B | detector | {result['size']}² decode |
|---|---|---|---|---|
{rows}

`vae.check` accepts it for shapes-v1: its patch colours on the check's test picture keep the colours apart as
shapes-v1's own VAE does (correlation above 0.9), {score:.1f} dB PSNR from them (the grade).
"""
    out = path.with_suffix(".md")
    out.write_text(card)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: train the tiny decoder and/or the warm VAE, and write their cards."""
    args = command_line("sdkit.shapes.decoders", ["tiny", "warm", "card", "all"], argv, models=MODELS)
    if args.part in ("tiny", "all"):
        print(train(runs=args.runs, steps=args.steps, models=args.models))
    if args.part in ("warm", "all"):
        print(train_warm(runs=args.runs, steps=args.steps, models=args.models))
    if args.part in ("card", "all"):
        print(model_card(runs=args.runs, models=args.models))
        print(warm_card(runs=args.runs, models=args.models))


if __name__ == "__main__":
    main()
