"""LoRAs on the tiny SD1 pipeline: formats, weights, removal bit for bit, refusals before any change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdkit import checkpoints, loras
from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings, generate
from sdkit.testing import write_lora

FAST = GenerationSettings(prompt="a red circle", seed=3, steps=3, width=32, height=32)
Q = ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")


@pytest.fixture(scope="module")
def pipe(tiny_files):
    return checkpoints.load(tiny_files["sd1"])


@pytest.fixture(autouse=True)
def clean(pipe):
    yield
    loras.remove(pipe)


def weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


def image(pipe) -> np.ndarray:
    return np.asarray(generate(pipe, FAST, progress=False)[0])


def test_apply_changes_the_picture_and_remove_restores_every_weight_bit_for_bit(pipe, tmp_path):
    write_lora(pipe, tmp_path / "style.safetensors")
    before, picture = weights(pipe), image(pipe)
    result = loras.apply(pipe, [(loras.load(tmp_path / "style.safetensors"), 1.0)])
    assert result.changed > 0 and result.message == ""
    assert not np.array_equal(image(pipe), picture)
    loras.remove(pipe)
    after = weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert np.array_equal(image(pipe), picture)
    assert loras.active(pipe) == []


def test_merged_weight_is_original_plus_weight_times_scaled_product(pipe, tmp_path):
    tensors = write_lora(pipe, tmp_path / "style.safetensors", rank=2, alpha=4.0)
    layer = "lora_unet_" + Q[1].replace(".", "_")
    original = loras._module(pipe, Q).weight.detach().float().clone()
    loras.apply(pipe, [(loras.load(tmp_path / "style.safetensors"), 0.5)])
    expected = original + 0.5 * (4.0 / 2) * tensors[f"{layer}.lora_up.weight"] @ tensors[f"{layer}.lora_down.weight"]
    merged = loras._module(pipe, Q).weight.float()
    torch.testing.assert_close(merged, expected.to(merged.dtype).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("naming", ["sai", "peft"])
def test_other_namings_reach_the_same_layers(pipe, tmp_path, naming):
    write_lora(pipe, tmp_path / "kohya.safetensors", seed=1, alpha=2.0)  # alpha = rank: scale 1, as PEFT's default
    write_lora(pipe, tmp_path / f"{naming}.safetensors", seed=1, naming=naming, alpha=2.0)
    loras.apply(pipe, [(loras.load(tmp_path / "kohya.safetensors"), 1.0)])
    reference = weights(pipe)
    loras.apply(pipe, [(loras.load(tmp_path / f"{naming}.safetensors"), 1.0)])
    other = weights(pipe)
    assert all(torch.equal(reference[k], other[k]) for k in reference)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_kinds_apply_and_come_off(pipe, tmp_path, kind):
    write_lora(pipe, tmp_path / f"{kind}.safetensors", kind=kind)
    before = weights(pipe)
    lora = loras.load(tmp_path / f"{kind}.safetensors")
    assert {layer.kind for layer in lora.layers.values()} == {kind}
    assert loras.apply(pipe, [(lora, 1.0)]).changed == len(lora.layers)
    assert not torch.equal(loras._module(pipe, Q).weight, before[".".join(Q) + ".weight"])
    loras.remove(pipe)
    assert all(torch.equal(before[k], v) for k, v in weights(pipe).items())


def test_loha_is_the_hadamard_product_of_two_low_rank_products(pipe, tmp_path):
    t = write_lora(pipe, tmp_path / "loha.safetensors", kind="loha", rank=2, alpha=2.0)
    layer = "lora_unet_" + Q[1].replace(".", "_")
    original = loras._module(pipe, Q).weight.detach().float().clone()
    loras.apply(pipe, [(loras.load(tmp_path / "loha.safetensors"), 1.0)])
    delta = (t[f"{layer}.hada_w1_a"] @ t[f"{layer}.hada_w1_b"]) * (t[f"{layer}.hada_w2_a"] @ t[f"{layer}.hada_w2_b"])
    merged = loras._module(pipe, Q).weight.float()
    torch.testing.assert_close(merged, (original + delta).to(merged.dtype).float(), rtol=1e-2, atol=1e-2)


def test_dora_rescales_each_column_to_its_trained_magnitude(pipe, tmp_path):
    t = write_lora(pipe, tmp_path / "dora.safetensors", dora=True)
    layer = "lora_unet_" + Q[1].replace(".", "_")
    loras.apply(pipe, [(loras.load(tmp_path / "dora.safetensors"), 1.0)])
    merged = loras._module(pipe, Q).weight.float()
    torch.testing.assert_close(merged.norm(dim=0, keepdim=True), t[f"{layer}.dora_scale"], rtol=2e-2, atol=2e-2)


def test_weights_add_up_and_negative_weights_subtract(pipe, tmp_path):
    write_lora(pipe, tmp_path / "a.safetensors", seed=1)
    write_lora(pipe, tmp_path / "b.safetensors", seed=2)
    a, b = loras.load(tmp_path / "a.safetensors"), loras.load(tmp_path / "b.safetensors")
    original = loras._module(pipe, Q).weight.detach().float().clone()
    loras.apply(pipe, [(a, 1.0)])
    da = loras._module(pipe, Q).weight.float() - original
    loras.apply(pipe, [(b, 1.0)])
    db = loras._module(pipe, Q).weight.float() - original
    loras.apply(pipe, [(a, 1.0), (b, -1.0)])
    both = loras._module(pipe, Q).weight.float() - original
    torch.testing.assert_close(both, da - db, rtol=0, atol=0.05)
    assert loras.active(pipe) == [("a", 1.0), ("b", -1.0)]


def test_a_lora_for_another_family_is_refused_before_anything_changes(pipe, tmp_path):
    write_lora(pipe, tmp_path / "xl.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    before, picture = weights(pipe), image(pipe)
    with pytest.raises(SdkitError, match=r"xl.safetensors is a LoRA for SDXL models .*ss_base_model_version.* "
                                         r"the loaded model is SD1.x"):
        loras.apply(pipe, [(loras.load(tmp_path / "xl.safetensors"), 1.0)])
    assert all(torch.equal(before[k], v) for k, v in weights(pipe).items())
    assert np.array_equal(image(pipe), picture)


def test_family_is_read_from_tensor_widths_when_metadata_is_silent(pipe, tmp_path):
    write_lora(pipe, tmp_path / "plain.safetensors")
    lora = loras.load(tmp_path / "plain.safetensors")
    assert lora.family is None  # the tiny model's 32-wide text features belong to no real family
    fake = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
            loras.Layer("lora", {"down": torch.zeros(4, 2048), "up": torch.zeros(320, 4)})}
    assert loras._family(fake, {})[0] == "sdxl"


def test_unmatched_layers_are_counted_and_named(pipe, tmp_path):
    from safetensors.torch import load_file, save_file

    write_lora(pipe, tmp_path / "style.safetensors")
    tensors = load_file(str(tmp_path / "style.safetensors"))
    tensors["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(2, 8)
    tensors["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(8, 2)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    result = loras.apply(pipe, [(loras.load(tmp_path / "extra.safetensors"), 1.0)])
    assert "1 layers of extra match nothing in this model (e.g. lora_unet_no_such_block_to_q)" in result.message


def test_a_lora_that_matches_nothing_is_refused(pipe, tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_elsewhere.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_elsewhere.lora_up.weight": torch.zeros(8, 2)}, str(tmp_path / "alien.safetensors"))
    with pytest.raises(SdkitError, match="None of the 1 layers of alien.safetensors match this model"):
        loras.apply(pipe, [(loras.load(tmp_path / "alien.safetensors"), 1.0)])


def test_a_layer_of_the_wrong_size_is_refused_before_anything_changes(pipe, tmp_path):
    from safetensors.torch import save_file

    layer = "lora_unet_" + Q[1].replace(".", "_")
    save_file({f"{layer}.lora_down.weight": torch.zeros(2, 999), f"{layer}.lora_up.weight": torch.zeros(7, 2)},
              str(tmp_path / "big.safetensors"))
    before = weights(pipe)
    with pytest.raises(SdkitError, match="does not fit this model"):
        loras.apply(pipe, [(loras.load(tmp_path / "big.safetensors"), 1.0)])
    assert all(torch.equal(before[k], v) for k, v in weights(pipe).items())


def test_a_file_that_is_no_lora_says_so(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.out.2.weight": torch.zeros(2)}, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(SdkitError, match="holds no LoRA layers"):
        loras.load(tmp_path / "ckpt.safetensors")


def test_text_encoder_layers_change_the_prompt_embedding(pipe, tmp_path):
    write_lora(pipe, tmp_path / "te.safetensors", scale=1.0)
    picture = image(pipe)
    loras.apply(pipe, [(loras.load(tmp_path / "te.safetensors"), 1.0)])
    changed = image(pipe)
    loras.remove(pipe)
    assert not np.array_equal(changed, picture)
    assert np.array_equal(image(pipe), picture), "the prompt cache must not keep the LoRA's embedding"


def test_prompt_tags_are_read_as_a1111_writes_them():
    clean, found = loras.tags("a cat <lora:style:0.8>, <LyCORIS:x> <lyco:hair> <lora:neg:-1.5:0.3> <lora:plain>")
    assert found == [("style", 0.8), ("hair", 1.0), ("neg", -1.5), ("plain", 1.0)]
    assert "<lora" not in clean and "<lyco" not in clean
    with pytest.raises(SdkitError, match=r"<lora:style:strong> has a weight that is not a number"):
        loras.tags("<lora:style:strong>")


def test_a_prompt_tag_applies_the_lora_and_a_prompt_without_tags_takes_it_off(pipe, tmp_path, monkeypatch):
    write_lora(pipe, tmp_path / "loras" / "style.safetensors", scale=1.0)
    monkeypatch.setenv("SDKIT_MODELS", str(tmp_path))
    plain = image(pipe)
    tagged = generate(pipe, FAST.replace(prompt="a red circle <lora:style:0.7>"), progress=False)[0]
    assert tagged.sdkit_settings.prompt == "a red circle <lora:style:0.7>", "the PNG keeps the prompt as written"
    assert loras.active(pipe) == [("style", 0.7)]
    loras.apply(pipe, [(loras.load(tmp_path / "loras" / "style.safetensors"), 0.7)])
    by_hand = generate(pipe, FAST.replace(prompt="a red circle "), progress=False)[0]
    assert np.array_equal(np.asarray(tagged), np.asarray(by_hand)), "a tag is the same as apply() by hand"
    assert loras.active(pipe) == [("style", 0.7)], "LoRAs applied by hand stay on for prompts without tags"
    generate(pipe, FAST.replace(prompt="a red circle <lora:style:0.7>"), progress=False)
    assert np.array_equal(image(pipe), plain), "after a tagged prompt, a prompt without tags takes the LoRA off"
    assert loras.active(pipe) == []


def test_cli_lora_option_writes_the_tag_into_the_png(pipe, tiny_files, tmp_path, monkeypatch, capsys):
    from sdkit.__main__ import main
    from sdkit.metadata import read_parameters

    write_lora(pipe, tmp_path / "loras" / "style.safetensors")
    monkeypatch.setenv("SDKIT_MODELS", str(tmp_path))
    main(["generate", "--model", str(tiny_files["sd1"]), "--prompt", "a red circle", "--lora", "style:0.5",
          "--steps", "2", "--width", "32", "--height", "32", "--out", str(tmp_path / "out"), "--quiet"])
    png = capsys.readouterr().out.strip().splitlines()[-1]
    assert read_parameters(png).prompt == "a red circle <lora:style:0.5>"


def test_cli_info_describes_a_lora(pipe, tmp_path, capsys):
    import json

    from sdkit.__main__ import main

    write_lora(pipe, tmp_path / "hada.safetensors", kind="loha", dora=True,
               metadata={"ss_base_model_version": "sd_v1", "ss_tag_frequency": json.dumps({"1_x": {"sks": 9, "red": 2}})})
    main(["info", str(tmp_path / "hada.safetensors"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["type"] == "LoHa (DoRA)" and result["family"] == "sd1" and result["text_encoder"]
    assert result["trigger_words"] == ["sks", "red"] and len(result["autov2"]) == 10


def test_a_kohya_lora_gives_the_same_picture_as_diffusers_own_loader(tmp_path):
    """fp32 tiny pipelines, UNet layers (diffusers 0.42 with transformers 5 does not take this file's text-encoder
    layers: "Could not automatically infer state dict type"; sdkit does, see the test above)."""
    from sdkit.testing import tiny_pipeline

    settings = FAST.replace(sampler="euler", steps=2)
    ours, theirs = tiny_pipeline("sd1"), tiny_pipeline("sd1")
    path = tmp_path / "style.safetensors"
    write_lora(ours, path, text_encoder=False, alpha=2.0)
    plain = np.asarray(generate(ours, settings, progress=False)[0]).astype(int)
    loras.apply(ours, [(loras.load(path), 1.0)])
    theirs.load_lora_weights(str(tmp_path), weight_name=path.name)
    a = np.asarray(generate(ours, settings, progress=False)[0]).astype(int)
    b = np.asarray(generate(theirs, settings, progress=False)[0]).astype(int)
    assert np.abs(a - plain).max() > 8, "the LoRA must visibly change the picture for the comparison to mean much"
    assert np.abs(a - b).max() <= 1, "merged weights (sdkit) vs PEFT layers (diffusers), both fp32"


def test_set_tag_rewrites_or_appends():
    assert loras._set_tag("a cat", "style", 0.5) == "a cat <lora:style:0.5>"
    assert loras._set_tag("a <lora:style:1> cat", "style", -0.25) == "a <lora:style:-0.25> cat"
    assert loras._set_tag("<lora:other:1>", "style", 1.0) == "<lora:other:1> <lora:style:1>"


def test_panel_group_turns_the_weight_and_use_brings_it_back(pipe, tmp_path, monkeypatch):
    from sdkit import widgets

    write_lora(pipe, tmp_path / "loras" / "style.safetensors", scale=1.0)
    monkeypatch.setenv("SDKIT_MODELS", str(tmp_path))
    group = loras.control_group(name="style", weight=0.8)
    panel = widgets.Panel(pipe, settings=FAST.replace(width=32, height=32), groups=[group], auto_run=False)
    panel.generate(wait=True)
    assert "Done" in panel.status.value, panel.status.value
    shot = panel.gallery[0]
    assert shot.settings.prompt.endswith("<lora:style:0.8>") and "<lora:style:0.8>" in shot.parameters
    assert loras.active(pipe) == [("style", 0.8)]
    group.weight.value = 0.0
    panel.generate(wait=True)
    assert loras.active(pipe) == [("style", 0.0)]
    panel.show(shot.settings)
    assert group.weight.value == 0.8
    panel.generate(wait=True)
    assert np.array_equal(np.asarray(panel.gallery[0].image), np.asarray(shot.image))


def test_png_text_carries_lora_hashes_as_a1111_writes_them(pipe, tmp_path, monkeypatch):
    import hashlib
    import struct

    from sdkit.metadata import format_parameters, parse_parameters

    write_lora(pipe, tmp_path / "loras" / "style.safetensors")
    monkeypatch.setenv("SDKIT_MODELS", str(tmp_path))
    data = (tmp_path / "loras" / "style.safetensors").read_bytes()
    expected = hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0]:]).hexdigest()[:12]  # kohya's addnet hash
    image = generate(pipe, FAST.replace(prompt="a cat <lora:style:0.5>"), progress=False)[0]
    assert image.sdkit_settings.extra["Lora hashes"] == f"style: {expected}"
    text = format_parameters(image.sdkit_settings)
    assert f'Lora hashes: "style: {expected}"' in text
    assert parse_parameters(text).extra["Lora hashes"] == f"style: {expected}"
