"""The teaching add-ons' training scripts (a few steps into a temporary folder) and the bundled files' effect."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdkit import checkpoints, embeddings, loras
from sdkit.shapes import addons
from sdkit.shapes.evaluate import style_share, word_share


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both add-ons trained for 3 steps, then 3 more after a resume, into a temporary models folder."""
    root = tmp_path_factory.mktemp("addons")
    files = {}
    for part in ("lora", "embedding"):
        addons.train(part, runs=root / "runs", steps=3, models=root / "models")
        files[part] = addons.train(part, runs=root / "runs", steps=6, models=root / "models")
    return root, files


def test_the_lora_is_a_kohya_locon_file_with_its_training_metadata(trained):
    _, files = trained
    lora = loras.load(files["lora"])
    assert lora.family == "shapes" and len(lora.layers) == 110
    assert all(name.startswith("lora_unet_") for name in lora.layers)
    conv = lora.layers["lora_unet_down_blocks_0_resnets_0_conv1"].tensors
    assert conv["down"].shape[2:] == (3, 3) and conv["up"].shape[2:] == (1, 1)  # LoCon: the kernel in "down"
    assert json.loads(lora.metadata["ss_network_args"])["algo"] == "locon"
    assert lora.metadata["ss_steps"] == "6" and lora.metadata["ss_network_dim"] == str(addons.LORA_RANK)


def test_a_resumed_run_continues_its_log_instead_of_starting_again(trained):
    root, _ = trained
    for name in (addons.LORA_NAME, addons.EMBEDDING_NAME):
        records = [json.loads(line) for line in (root / "runs" / f"{name}.log").read_text().splitlines()]
        assert sum(r.get("event") == "start" for r in records) == 1
        assert [r["step"] for r in records if "loss" in r] == [3, 6]


def test_the_embedding_is_an_a1111_file_whose_word_is_its_name(trained):
    _, files = trained
    moon = embeddings.load(files["embedding"])
    assert moon.name == "moon" and moon.count == 2 and moon.vectors["*"].shape == (2, 64)


def test_the_embedding_trains_only_its_two_vectors():
    task = addons.EmbeddingTask()
    trainable = [p for p in task.parameters() if p.requires_grad]
    assert trainable == [task.vectors]
    loss = task.loss(0, addons.Plan(steps=1, batch=4, lr=0))
    loss.backward()
    assert task.vectors.grad is not None and task.vectors.grad.abs().sum() > 0


# --- the bundled files meet the bar: 16 seeded samples each --------------------------------------------


@pytest.fixture(scope="module")
def shapes():
    return checkpoints.load("shapes-v1")


def test_bundled_lora_style_shows_at_weight_1_and_not_at_0(shapes):
    shares = style_share(shapes, loras.load("outlines"), weights=(0.0, 1.0), progress=False)
    assert shares[1.0] >= 0.8 and shares[0.0] <= 0.1, shares


def test_bundled_embedding_word_shows_with_the_file_and_not_without(shapes):
    shares = word_share(shapes, "moon", look=addons.MOON, prompts=addons.MOON_CAPTIONS, progress=False)
    assert shares["with"] >= 0.8 and shares["without"] <= 0.1, shares


def test_removing_the_bundled_lora_gives_the_same_pixels(shapes):
    from sdkit.generate import GenerationSettings, generate

    settings = GenerationSettings(prompt="a red circle on a white background", seed=4, steps=10, width=64, height=64)
    before = np.asarray(generate(shapes, settings, progress=False)[0])
    loras.apply(shapes, [(loras.load("outlines"), 1.3)])
    changed = np.asarray(generate(shapes, settings, progress=False)[0])
    loras.remove(shapes)
    after = np.asarray(generate(shapes, settings, progress=False)[0])
    assert not np.array_equal(before, changed) and np.array_equal(before, after)


def test_the_bundled_locon_gives_the_same_picture_as_diffusers_own_loader(monkeypatch):
    """fp32 shapes-v1 (exact sums, so any difference is the loaders'), the bundled LoCon with its conv layers."""
    import copy

    from sdkit.generate import GenerationSettings, generate

    monkeypatch.setenv("SDKIT_DTYPE", "float32")
    ours = checkpoints.load("shapes-v1")
    theirs = copy.deepcopy(ours)
    lora = loras.load("outlines")
    settings = GenerationSettings(prompt="a blue square on a white background", seed=2, steps=20, width=64, height=64)
    plain = np.asarray(generate(ours, settings, progress=False)[0]).astype(int)
    loras.apply(ours, [(lora, 1.0)])
    theirs.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name)
    a = np.asarray(generate(ours, settings, progress=False)[0]).astype(int)
    b = np.asarray(generate(theirs, settings, progress=False)[0]).astype(int)
    loras.remove(ours)
    assert np.abs(a - plain).max() > 100, "the outline LoRA changes the picture a lot"
    assert np.abs(a - b).max() <= 2, f"merged (sdkit) vs PEFT layers (diffusers): max {np.abs(a - b).max()} of 255"
