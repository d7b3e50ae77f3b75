"""Cheap live previews: latents -> RGB through the family's tiny decoder (TAESD) when the vae_approx folder has it,
else through a linear map fitted to the model's own VAE; never the full decoder per step."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

FIT_SIZE = 64  # pixels per side of the pictures the map is fitted on (8x8 latents: a fraction of a second)


def _fit_pictures(*, count: int = 16, seed: int = 0) -> torch.Tensor:
    """Pictures to fit on, in [-1, 1] NCHW: shapes-world scenes and random colour patches (every hue, light and dark)."""
    from sdkit.shapes import data

    scenes, _ = data.dataset_arrays(count // 2, seed=seed, size=FIT_SIZE)
    rng = np.random.default_rng(seed)
    patches = rng.integers(0, 256, (count - count // 2, 4, 4, 3), dtype=np.uint8).repeat(16, 1).repeat(16, 2)
    pictures = np.concatenate([scenes, patches]).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(pictures).permute(0, 3, 1, 2)


def factors(vae) -> torch.Tensor:
    """The (latent channels + 1) x 3 least-squares map from a latent pixel (as the pipeline holds it) to its RGB colour.

    Fitted once per VAE on pictures it encodes, and cached on it, so any VAE gets a preview without a hand-made table
    (A1111's and ComfyUI's 'latent_rgb_factors' are the same idea, written down per family).
    """
    cached = getattr(vae, "_sdkit_preview_factors", None)
    if cached is not None:
        return cached
    pictures = _fit_pictures()
    with torch.inference_mode():
        latents = vae.encode(pictures.to(vae.device, vae.dtype)).latent_dist.mean.float().cpu()
    latents = latents * vae.config.scaling_factor
    colours = torch.nn.functional.adaptive_avg_pool2d(pictures, latents.shape[-2:])
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    y = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x, y).solution
    vae._sdkit_preview_factors = solution
    return solution


def to_image(latents: torch.Tensor, vae, *, scale: int | None = None) -> Image.Image:
    """A preview of the first latent of a batch, `scale` times its size (by default the VAE's own factor)."""
    mapping = factors(vae)
    scale = scale or 2 ** (len(vae.config.block_out_channels) - 1)
    latent = latents[0].detach().float().cpu()
    rgb = torch.einsum("chw,cr->hwr", latent, mapping[:-1]) + mapping[-1]
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.BILINEAR)


def show(pipe, latents: torch.Tensor) -> Image.Image:
    """The preview of the first latent of a batch: the tiny decoder's picture if there is one, else the linear map's."""
    from sdkit import vae as vaes

    tiny = vaes.tiny_for(pipe)
    if tiny is None:
        return to_image(latents, vaes.original(pipe))
    with torch.inference_mode():
        pixels = tiny.model.decode(latents[:1].detach().to(tiny.model.device, tiny.model.dtype)).sample[0].float()
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
