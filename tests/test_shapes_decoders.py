"""The tiny decoder's training script, a few steps into a temporary folder, and the bundled file."""

from __future__ import annotations

import json

import torch

from sdkit import vae
from sdkit.shapes import decoders


def test_a_few_steps_write_a_taesd_file_that_sdkit_reads_back(tmp_path):
    out = decoders.train(runs=tmp_path / "runs", steps=3, models=tmp_path / "models")
    assert out.name == "taesd_shapes_decoder.safetensors"
    tiny = vae.load(out)
    assert tiny.kind == "tiny" and list(tiny.model.config.num_decoder_blocks) == list(decoders.TINY_BLOCKS)
    log = [json.loads(line) for line in (tmp_path / "runs" / "taesd_shapes_decoder.log").read_text().splitlines()]
    assert log[0]["event"] == "start" and log[-1]["event"] == "done"
    with torch.no_grad():
        assert tiny.model.decode(torch.zeros(1, 4, 16, 16)).sample.shape == (1, 3, 64, 64)


def test_the_bundled_tiny_decoder_is_found_for_shapes_v1_and_reads_its_latents():
    from sdkit.checkpoints import load

    pipe = load("shapes-v1")
    pipe.__dict__.pop("_sdkit_tiny_decoder", None)
    tiny = vae.tiny_for(pipe)
    assert tiny is not None and tiny.name == decoders.TINY_NAME
    assert vae.check(pipe, tiny) > 25, "patch colours close to the full VAE's"


def test_a_few_warm_steps_write_a_single_file_vae_that_sdkit_reads_back(tmp_path):
    out = decoders.train_warm(runs=tmp_path / "runs", steps=2, models=tmp_path / "models")
    assert out.name == "shapes-v1-warm.safetensors"
    from sdkit import formats

    names = list(formats.read_specs(out)[0])
    assert "encoder.down.0.block.0.conv1.weight" in names and "decoder.mid.attn_1.q.weight" in names
    warm = vae.load(out)
    assert warm.kind == "full" and warm.model.config.norm_num_groups == 4


def test_the_warm_grade_lifts_red_and_lowers_blue():
    pixels = torch.tensor([[1.0, -1.0], [1.0, -1.0], [1.0, -1.0]]).view(1, 3, 1, 2)  # white, black
    graded = (decoders.warm(pixels) + 1) * 127.5
    assert torch.allclose(graded[0, :, 0, 0], torch.tensor([253.5, 250.25, 214.2]), atol=0.01)  # white: cream
    assert torch.allclose(graded[0, :, 0, 1], torch.tensor([24.0, 8.0, 0.0]), atol=0.01)  # black: dark brown


def test_the_bundled_warm_vae_changes_colours_measurably_and_restore_gives_back_every_pixel():
    import numpy as np

    from sdkit.checkpoints import load
    from sdkit.generate import GenerationSettings, generate

    pipe = load("shapes-v1")
    warm = vae.load(decoders.WARM_NAME)
    rows = decoders.compare(pipe, {"own": None, "warm": warm}, count=8, size=64, repeats=1)["rows"]
    assert rows["warm"]["colour_error"] > rows["own"]["colour_error"] + 5
    red, _, blue = np.array(rows["warm"]["shift_rgb"]) - np.array(rows["own"]["shift_rgb"])
    assert red > 5 and blue < -5, "warmer: more red, less blue than the model's own VAE"
    assert rows["warm"]["detector_same"] >= 0.75, "the same shapes and colours, graded"
    settings = GenerationSettings(prompt="a blue circle on a white background", seed=1, steps=8, width=64, height=64)
    before = np.asarray(generate(pipe, settings, progress=False)[0])
    vae.apply(pipe, warm)
    try:
        swapped = np.asarray(generate(pipe, settings, progress=False)[0])
    finally:
        vae.restore(pipe)
    assert np.abs(swapped.astype(int) - before.astype(int)).mean() > 5
    assert np.array_equal(np.asarray(generate(pipe, settings, progress=False)[0]), before)
