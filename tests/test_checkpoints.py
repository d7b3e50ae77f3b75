from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdkit import checkpoints
from sdkit.errors import SdkitError
from sdkit.testing import tiny_pipeline


@pytest.fixture
def fp32(monkeypatch):
    monkeypatch.setenv("SDKIT_DTYPE", "float32")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tiny_checkpoint_round_trip_gives_the_same_outputs(tiny_files, family, fp32):
    reference = tiny_pipeline(family)  # same seed as the file's
    pipe = checkpoints.load(tiny_files[family])
    assert pipe.sdkit.family == family
    encoders = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for part in ["unet", "vae", *encoders]:
        a, b = getattr(reference, part).state_dict(), getattr(pipe, part).state_dict()
        assert set(a) == set(b), part
        assert all(torch.equal(a[k], b[k]) for k in a), part
    ids = torch.tensor([[49406, 320, 1125, 49407]])
    for part in encoders:
        assert torch.allclose(getattr(reference, part)(ids)[0], getattr(pipe, part)(ids)[0], atol=1e-5)
    sample = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, reference.unet.config.cross_attention_dim)
    extra = {}
    if family == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 64), "time_ids": torch.randn(1, 6)}}
    with torch.no_grad():
        expected = reference.unet(sample, 10, context, **extra).sample
        assert torch.allclose(pipe.unet(sample, 10, context, **extra).sample, expected, atol=1e-5)


def test_same_file_twice_is_cached(tiny_files):
    assert checkpoints.load(tiny_files["sd1"]) is checkpoints.load(tiny_files["sd1"])


def test_load_by_name_from_models_root(tiny_files, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(tiny_files["sd2"], tmp_path / "checkpoints" / "my-model.safetensors")
    pipe = checkpoints.load("my-model", root=tmp_path)
    assert pipe.sdkit.name == "my-model.safetensors" and pipe.sdkit.prediction == "v_prediction"
    assert len(pipe.sdkit.autov2) == 10


def test_dtypes_follow_the_device_choice(tiny_files):
    from sdkit import device

    pipe = checkpoints.load(tiny_files["sd1"])
    choices = device.choose(device.report())
    assert pipe.unet.dtype == choices["unet"].torch_dtype
    assert pipe.vae.dtype == choices["vae"].torch_dtype
    assert pipe.sdkit.dtypes["vae"] == choices["vae"].dtype


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_real_size_shapes_map_to_the_shipped_configs(family):
    """A full-size model's tensor shapes (built on the meta device: no memory) infer exactly the shipped config."""
    import json

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdkit.convert import pipeline_to_ldm
    from sdkit.formats import TensorSpec

    folder = checkpoints.CONFIGS / family

    def config(sub):
        return json.loads((folder / sub / "config.json").read_text())

    class Parts:
        pass

    parts = Parts()
    with init_empty_weights():
        parts.unet = UNet2DConditionModel.from_config(config("unet"))
        parts.vae = AutoencoderKL.from_config(config("vae"))
        parts.text_encoder = CLIPTextModel(CLIPTextConfig(**config("text_encoder")))
        if family == "sdxl":
            parts.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2")))
    state = pipeline_to_ldm(parts, family=family)
    specs = {k: TensorSpec(str(v.dtype), tuple(v.shape)) for k, v in state.items()}
    assert checkpoints.config_dir(specs, family) == folder


def test_missing_weights_are_reported(tiny_files, tmp_path):
    state = load_file(tiny_files["sd1"])
    del state["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"]
    f = tmp_path / "broken.safetensors"
    save_file(state, str(f))
    with pytest.raises(SdkitError, match="lacks tensors") as err:
        checkpoints.load(f)
    assert "encoder.layers.0.mlp.fc1.weight" in str(err.value)
    del state["cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.bias"]
    state["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(128, 32)
    save_file(state, str(f))
    with pytest.raises(SdkitError, match="text_encoder is incomplete"):
        checkpoints.load(f)


def test_weight_of_the_wrong_shape_is_named(tiny_files, tmp_path):
    state = load_file(tiny_files["sd1"])
    name = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    state[name] = state[name][:, :, :1, :1].contiguous()  # a 1x1 kernel where the UNet has 3x3
    f = tmp_path / "mixed.safetensors"
    save_file(state, str(f))
    with pytest.raises(SdkitError, match=r"unet weight .*resnets.0.conv1.weight is \[32, 32, 1, 1\].*needs \[32, 32, 3, 3\]"):
        checkpoints.load(f)


def test_loading_does_not_change_the_file(tiny_files, tmp_path):
    f = tmp_path / "mine.safetensors"
    shutil.copy(tiny_files["sdxl"], f)
    before = f.read_bytes()
    checkpoints.load(f)
    assert f.read_bytes() == before


def test_unsupported_family_is_explained(tmp_path):
    f = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, str(f))
    with pytest.raises(SdkitError, match="is a flux checkpoint"):
        checkpoints.load(f)


def test_missing_name_lists_models(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "a.safetensors").write_bytes(b"x")
    with pytest.raises(SdkitError, match="a.safetensors"):
        checkpoints.load("b", root=tmp_path)


def test_old_sd1_text_encoder_layout_loads(tiny_files, tmp_path, fp32):
    old = "cond_stage_model.transformer."
    state = {k.replace(old + "text_model.", old): v for k, v in load_file(tiny_files["sd1"]).items()}
    assert not any("text_model." in k for k in state)
    f = tmp_path / "old-layout.safetensors"
    save_file(state, str(f))
    pipe = checkpoints.load(f)
    reference = checkpoints.load(tiny_files["sd1"])
    ids = torch.tensor([[49406, 320, 49407]])
    assert torch.equal(pipe.text_encoder(ids)[0], reference.text_encoder(ids)[0])


def test_inpainting_unet_is_refused_with_a_reason(tiny_files, tmp_path):
    state = load_file(tiny_files["sd1"])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.zeros(state[key].shape[0], 9, 3, 3)
    f = tmp_path / "inpaint.safetensors"
    save_file(state, str(f))
    with pytest.raises(SdkitError, match="inpainting UNet"):
        checkpoints.load(f)


def test_file_without_vae_is_refused_with_a_reason(tiny_files, tmp_path):
    state = {k: v for k, v in load_file(tiny_files["sd1"]).items() if not k.startswith("first_stage_model.")}
    f = tmp_path / "pruned.safetensors"
    save_file(state, str(f))
    with pytest.raises(SdkitError, match="has no vae"):
        checkpoints.load(f)


def test_ckpt_with_numpy_scalars_loads(tiny_files, tmp_path, fp32):
    import numpy as np

    f = tmp_path / "dreambooth.ckpt"
    torch.save({"state_dict": load_file(tiny_files["sd1"]), "global_step": np.int64(470000),
                "epoch": np.float64(3.0)}, f)
    assert checkpoints.load(f).sdkit.family == "sd1"


def test_prediction_override(tiny_files):
    assert checkpoints.load(tiny_files["sd2"], prediction="epsilon").sdkit.width == 512
    with pytest.raises(SdkitError, match="prediction='x'"):
        checkpoints.load(tiny_files["sd2"], prediction="x")


def test_model_too_big_for_free_memory_is_refused_before_loading(tiny_files, monkeypatch):
    import psutil

    class Tiny:
        available = 1024  # bytes free

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    checkpoints._cache.clear()
    with pytest.raises(SdkitError, match=r"needs about 0\.0 GiB .* only 0\.0 GiB of memory is free") as error:
        checkpoints.load(tiny_files["sd1"])
    assert "smaller file" in error.value.fix
    assert not checkpoints._cache


def test_memory_estimate_counts_weights_in_the_chosen_dtypes():
    from sdkit.device import Choice
    from sdkit.formats import TensorSpec

    specs = {"model.diffusion_model.a": TensorSpec("float32", (1024, 1024)),
             "first_stage_model.b": TensorSpec("float16", (1024, 1024))}
    choices = {"unet": Choice("cpu", "bfloat16", ""), "text_encoder": Choice("cpu", "bfloat16", ""),
               "vae": Choice("cpu", "float32", "")}
    assert checkpoints.memory_needed_gib(specs, choices) == pytest.approx((2 + 4) * 2**20 / 2**30)
