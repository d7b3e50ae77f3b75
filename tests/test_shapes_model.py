"""The bundled shapes-v1 checkpoint: loaded through the loader a user calls, offline, and measurably trained."""

from __future__ import annotations

import json

import numpy as np
import torch

from sdkit import checkpoints, formats
from sdkit.convert import save_single_file
from sdkit.generate import GenerationSettings, generate
from sdkit.paths import BUNDLED_ROOT
from sdkit.shapes import data
from sdkit.shapes.evaluate import evaluate

BUNDLED = BUNDLED_ROOT / "checkpoints" / "shapes-v1.safetensors"


def test_bundled_file_is_a_shapes_checkpoint_in_original_layout():
    info = formats.info(BUNDLED)
    assert info["family"] == "shapes" and info["dtype"] == "float16"
    assert info["components"] == ["unet", "vae", "text_encoder"]
    specs, _ = formats.read_specs(BUNDLED)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in specs)
    total = sum(f.stat().st_size for f in BUNDLED_ROOT.rglob("*") if f.is_file())
    assert total <= 30 * 2**20


def test_loads_by_name_offline_like_any_checkpoint():
    pipe = checkpoints.load("shapes-v1")
    assert pipe.sdkit.family == "shapes" and (pipe.sdkit.width, pipe.sdkit.height) == (64, 64)
    assert pipe.vae.config.latent_channels == 4


def test_save_then_load_gives_the_same_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("SDKIT_DTYPE", "float32")
    original = checkpoints.load(BUNDLED)
    copy = tmp_path / "copy.safetensors"
    save_single_file(original, copy, family="sd1", metadata={"modelspec.architecture": "sdkit-shapes-v1"},
                     dtype=torch.float16)
    reloaded = checkpoints.load(copy)
    settings = GenerationSettings(prompt="a blue triangle on a black background", seed=3, steps=8, width=64, height=64)
    a = np.asarray(generate(original, settings, progress=False)[0])
    b = np.asarray(generate(reloaded, settings, progress=False)[0])
    assert np.array_equal(a, b)


def test_follows_full_prompts_far_above_chance():
    result = evaluate(checkpoints.load("shapes-v1"), seeds=1, vague_seeds=0, prompts=data.full_captions()[::2],
                      progress=False)
    acc = result["accuracy"]
    assert acc["colour"] >= 0.75 and acc["shape"] >= 0.6 and acc["background"] >= 0.9, acc


def test_vague_prompt_varies_what_it_leaves_open():
    result = evaluate(checkpoints.load("shapes-v1"), seeds=0, vague_seeds=8, prompts=["a red circle on a white background"],
                      progress=False)
    red = next(r for r in result["vague"] if r["prompt"] == "a red shape")
    assert red["colour"]["accuracy"] >= 0.6
    assert red["shape"]["spread"] > 0.3  # the shape was left open, so more than one shape appears


def test_cli_evaluate_json(capsys):
    from sdkit.__main__ import main

    assert main(["evaluate", "shapes", "--seeds", "1", "--vague-seeds", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 24 and set(result["accuracy"]) == {"colour", "shape", "background", "all"}
    assert result["seconds_per_image"] > 0 and "shape" in result["confusion"]


def test_in_memory_model_saved_then_loaded_gives_the_same_outputs(tmp_path, monkeypatch):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from sdkit.checkpoints import CONFIGS, _tokenizer
    from sdkit.shapes import train

    monkeypatch.setenv("SDKIT_DTYPE", "float32")
    parts = {name: train.build(part, seed=i).eval() for i, (name, part) in
             enumerate([("vae", "vae"), ("text_encoder", "text"), ("unet", "unet")])}
    with torch.no_grad():  # move every weight off its initial value, so nothing is right by accident
        for model in parts.values():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    pipe = StableDiffusionPipeline(**parts, tokenizer=_tokenizer("clip_l"), safety_checker=None, feature_extractor=None,
                                   scheduler=EulerDiscreteScheduler.from_pretrained(CONFIGS / "shapes", subfolder="scheduler"),
                                   requires_safety_checker=False)
    path = tmp_path / "trained.safetensors"
    save_single_file(pipe, path, family="sd1", metadata={"modelspec.architecture": "sdkit-shapes-v1"})
    loaded = checkpoints.load(path)
    ids = torch.tensor([[49406, 320, 736, 2866, 49407]])
    latents, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 64)
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids)[0], loaded.text_encoder(ids)[0])
        # the loaded conv nets run channels-last (sdkit's fast path): same maths, another summation order
        close = {"atol": 1e-5, "rtol": 1e-4}
        assert torch.allclose(pipe.unet(latents, 10, context).sample, loaded.unet(latents, 10, context).sample, **close)
        assert torch.allclose(pipe.vae.decode(latents).sample, loaded.vae.decode(latents).sample, **close)
