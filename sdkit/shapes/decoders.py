"""Train shapes-v1's tiny decoder on this CPU: python -m sdkit.shapes.decoders {tiny,card}.

`taesd_shapes_decoder`: TAESD's architecture (diffusers' AutoencoderTiny decoder) distilled from shapes-v1's own
VAE decoder, written in TAESD's numbered single-file layout as ComfyUI's vae_approx folder keeps it. The panel's
live preview uses it, and `vae.apply` can use it as a fast final decode. Seeded and resumable like every
shapes-world training script (sdkit.shapes.addons.fit).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdkit.shapes import data
from sdkit.shapes.addons import MODELS, Plan, base_parts, fit
from sdkit.shapes.train import RUNS

TINY_NAME = "taesd_shapes_decoder"
TINY_WIDTH, TINY_BLOCKS = 16, (2, 2, 1)  # 3 groups = 2 upsamplings: shapes-v1's VAE is 4x, not SD's 8x
PLANS = {"tiny": Plan(steps=1500, batch=32, lr=2e-3)}


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
        rng = np.random.default_rng(plan.seed * 1_000_003 + step)
        pictures = []
        for _ in range(plan.batch):
            spec = data.random_spec(rng)
            spec.style = ("fill", "fill", "outline")[int(rng.integers(3))]  # the outlines LoRA's pictures too
            pictures.append(np.asarray(data.draw(spec)))
        pixels = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(step))
            target = self.vae.decode(latents).sample
        return latents * self.vae.config.scaling_factor, target

    def loss(self, step: int, plan: Plan) -> torch.Tensor:
        """L1 + MSE to the full decoder's picture."""
        latents, target = self.pair(step, plan)
        out = self.tiny.decode(latents).sample
        return F.l1_loss(out, target) + F.mse_loss(out, target)


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


def main(argv: list[str] | None = None) -> None:
    """Command line: train the tiny decoder."""
    parser = argparse.ArgumentParser(prog="python -m sdkit.shapes.decoders", description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["tiny"])
    parser.add_argument("--runs", type=Path, default=RUNS, help="where logs and resumable states go")
    parser.add_argument("--steps", type=int, help="override the plan's step count (for quick trials)")
    parser.add_argument("--models", type=Path, default=MODELS, help="the models folder the file goes into")
    args = parser.parse_args(argv)
    print(train(runs=args.runs, steps=args.steps, models=args.models))


if __name__ == "__main__":
    main()
