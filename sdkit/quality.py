"""How close two pictures are: PSNR, SSIM and mean colour error, on 8-bit RGB pictures of the same size.

    quality.psnr(upscaled, reference)          # dB, higher is closer (identical pictures: inf)
    quality.ssim(upscaled, reference)          # 0..1, structure as the eye sees it (1: identical)
    quality.colour_error(decoded, reference)   # mean |difference| per channel, in 0..255 steps

Written here (about 20 lines) rather than imported: scikit-image's `structural_similarity` would add a large
dependency for one function; this is Wang et al.'s SSIM with its usual constants (11x11 Gaussian, sigma 1.5,
K1 0.01, K2 0.03, on each channel, then averaged), as scikit-image computes it with `gaussian_weights=True`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from sdkit.errors import SdkitError


def _pair(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both pictures as float64 RGB arrays in 0..255, refusing different sizes."""
    x = np.asarray(a.convert("RGB") if isinstance(a, Image.Image) else a, dtype=np.float64)
    y = np.asarray(b.convert("RGB") if isinstance(b, Image.Image) else b, dtype=np.float64)
    x, y = (np.repeat(v[..., None], 3, axis=2) if v.ndim == 2 else v for v in (x, y))  # grey arrays as RGB
    if x.shape != y.shape:
        raise SdkitError(f"cannot compare a {x.shape[1]}x{x.shape[0]} picture with a {y.shape[1]}x{y.shape[0]} one.",
                         fix="resize one of them first (e.g. PIL's Image.resize)")
    return x, y


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB (8-bit peak 255); inf for identical pictures."""
    x, y = _pair(a, b)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def colour_error(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Mean absolute difference per channel, in 8-bit steps (0 identical, 255 opposite)."""
    x, y = _pair(a, b)
    return float(np.mean(np.abs(x - y)))


def ssim(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004), mean over pixels and channels; 1.0 for identical pictures."""
    from scipy.ndimage import gaussian_filter

    x, y = _pair(a, b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda image: gaussian_filter(image, sigma=(1.5, 1.5, 0), truncate=3.5)  # noqa: E731  11x11 window
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    n = 11 * 11  # sample (not population) covariance, as scikit-image uses
    vx, vy, cov = vx * n / (n - 1), vy * n / (n - 1), cov * n / (n - 1)
    score = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    pad = 5  # scikit-image leaves out the border where the window is incomplete
    return float(score[pad:-pad, pad:-pad].mean())
