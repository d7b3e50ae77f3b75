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
    assert vae.check(pipe, tiny) > vae.COMPATIBLE_PSNR
