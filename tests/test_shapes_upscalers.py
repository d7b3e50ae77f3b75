"""The shapes world's upscaler: its training script, a few steps into a temporary folder, and the bundled file."""

from __future__ import annotations

import json

from sdkit import upscale
from sdkit.shapes import upscalers


def test_a_few_steps_write_a_compact_file_that_spandrel_reads_back(tmp_path):
    out = upscalers.train(runs=tmp_path / "runs", steps=2, models=tmp_path / "models")
    model = upscale.load(out)
    assert model.architecture == "RealESRGAN Compact" and model.scale == upscalers.SCALE
    log = [json.loads(line) for line in (tmp_path / "runs" / f"{upscalers.NAME}.log").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[-1]["event"] == "done"


def test_held_out_pictures_are_not_training_pictures():
    import numpy as np

    first = np.asarray(upscalers.held_out(1)[0])
    rng = np.random.default_rng(0 * 1_000_003 + 0)  # step 0's batch
    assert not np.array_equal(first, np.asarray(upscalers.random_picture(rng, size=upscalers.DRAWN)))


def test_the_bundled_upscaler_beats_bicubic_by_a_decibel_on_32_held_out_pictures():
    result = upscalers.measure(count=32)
    assert result["gain_db"] >= 1.0, result
    assert result["wins"] >= 28, "better on nearly every picture, not on average only"
