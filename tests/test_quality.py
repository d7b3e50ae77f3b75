"""sdkit.quality: PSNR, SSIM and colour error on known pictures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from sdkit import quality
from sdkit.errors import SdkitError


def noisy(picture: np.ndarray, sigma: float, *, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(picture + rng.normal(0, sigma, picture.shape), 0, 255).round().astype(np.uint8)


PICTURE = np.asarray(Image.radial_gradient("L").resize((64, 64)).convert("RGB"))


def test_identical_pictures_score_perfectly():
    assert quality.psnr(PICTURE, PICTURE) == math.inf
    assert quality.ssim(PICTURE, PICTURE) == pytest.approx(1.0)
    assert quality.colour_error(PICTURE, PICTURE) == 0


def test_psnr_and_colour_error_follow_their_formulas():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 10, np.uint8)
    assert quality.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))
    assert quality.colour_error(a, b) == 10


def test_ssim_falls_as_noise_grows():
    scores = [quality.ssim(noisy(PICTURE, s), PICTURE) for s in (2, 8, 32)]
    assert 1 > scores[0] > scores[1] > scores[2] > 0


def test_pictures_of_different_sizes_are_refused():
    with pytest.raises(SdkitError, match="64x64 picture with a 32x32"):
        quality.psnr(PICTURE, PICTURE[:32, :32])
