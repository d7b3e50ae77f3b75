"""VAE files in every layout people share, swapped onto tiny pipelines and back; tiny decoders; tiled decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdkit import checkpoints, formats, vae
from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings, generate

FAST = GenerationSettings(prompt="a red circle", seed=5, steps=3, width=32, height=32)


@pytest.fixture(scope="module")
def sd1(tiny_files):
    return checkpoints.load(tiny_files["sd1"])


def pixels(pipe, settings=FAST) -> np.ndarray:
    return np.asarray(generate(pipe, settings, progress=False)[0]).astype(int)


def own_vae_file(tiny_files, path, *, layout: str, noise: float = 0.0, seed: int = 0):
    """The tiny SD1 checkpoint's own VAE as a standalone file, its decoder nudged by `noise` (a fine-tuned VAE)."""
    state = formats.load_state_dict(tiny_files["sd1"])
    original = {k: v.float().clone() for k, v in state.items() if k.startswith("first_stage_model.")}
    generator = torch.Generator().manual_seed(seed)
    for k, v in original.items():
        if ".decoder." in k and v.dim() > 1:
            v += noise * v.std() * torch.randn(v.shape, generator=generator)
    if layout == "bare":
        original = {k.removeprefix("first_stage_model."): v for k, v in original.items()}
    elif layout == "diffusers":
        built = vae._full({k.removeprefix("first_stage_model."): v for k, v in original.items()}, path=path, metadata={})
        original = built.state_dict()
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    else:
        torch.save({"state_dict": original}, path)
    return path


@pytest.mark.parametrize("layout, suffix", [("prefixed", ".safetensors"), ("bare", ".safetensors"),
                                            ("diffusers", ".safetensors"), ("bare", ".ckpt")])
def test_every_layout_loads_as_the_same_vae(sd1, tiny_files, tmp_path, layout, suffix):
    loaded = vae.load(own_vae_file(tiny_files, tmp_path / f"own{suffix}", layout=layout))
    assert loaded.kind == "full" and loaded.latent_channels == 4
    assert vae.check(sd1, loaded) > 40, "the checkpoint's own VAE decodes its latents exactly"


def test_a_swapped_vae_changes_the_picture_and_restore_brings_back_every_pixel(sd1, tiny_files, tmp_path):
    before = pixels(sd1)
    tuned = vae.load(own_vae_file(tiny_files, tmp_path / "tuned.safetensors", layout="bare", noise=0.05))
    score = vae.apply(sd1, tuned)
    assert vae.active(sd1) == "tuned" and score > 20
    swapped = pixels(sd1)
    vae.restore(sd1)
    assert vae.active(sd1) == ""
    assert np.abs(swapped - before).max() > 0
    assert np.array_equal(pixels(sd1), before)


def test_a_vae_for_another_latent_space_is_refused_before_anything_changes(sd1, tmp_path):
    from diffusers import AutoencoderKL

    before = pixels(sd1)
    torch.manual_seed(3)
    stranger = AutoencoderKL.from_config(dict(vae.original(sd1).config))  # same shape, other weights
    save_file({k: v.contiguous() for k, v in stranger.state_dict().items()}, str(tmp_path / "stranger.safetensors"))
    with pytest.raises(SdkitError, match="other colours"):
        vae.apply(sd1, vae.load(tmp_path / "stranger.safetensors"))
    assert vae.active(sd1) == "" and np.array_equal(pixels(sd1), before)


def test_a_16_channel_vae_is_refused_naming_both(sd1, tmp_path):
    from diffusers import AutoencoderKL

    config = {**dict(vae.original(sd1).config), "latent_channels": 16}
    flux_like = AutoencoderKL.from_config(config)
    save_file({k: v.contiguous() for k, v in flux_like.state_dict().items()}, str(tmp_path / "ae.safetensors"))
    with pytest.raises(SdkitError) as error:
        vae.apply(sd1, vae.load(tmp_path / "ae.safetensors"))
    assert "16-channel" in str(error.value) and "4-channel" in str(error.value)


def test_a_file_that_is_no_vae_says_so(tmp_path):
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(tmp_path / "style.safetensors"))
    with pytest.raises(SdkitError, match="is not a VAE"):
        vae.load(tmp_path / "style.safetensors")


def taesd_file(path, *, latent_channels: int = 4, blocks=(1, 1, 1), width: int = 8, seed: int = 0):
    """A random tiny decoder in TAESD's own numbered layout (index 0 is the Clamp, so tensors start at 1)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(latent_channels=latent_channels, decoder_block_out_channels=[width] * len(blocks),
                            num_decoder_blocks=list(blocks), encoder_block_out_channels=[width] * len(blocks),
                            num_encoder_blocks=[1] * len(blocks))
    layers = {k.removeprefix("layers."): v for k, v in model.decoder.state_dict().items()}
    numbered = {f"{int(k.split('.')[0]) + 1}.{k.split('.', 1)[1]}": v for k, v in layers.items()}
    torch.save(numbered, path)
    return model


def test_a_taesd_decoder_in_its_own_layout_is_rebuilt_exactly(tmp_path):
    reference = taesd_file(tmp_path / "taesd_decoder.pth", blocks=(2, 1, 1))
    tiny = vae.load(tmp_path / "taesd_decoder.pth")
    assert tiny.kind == "tiny" and list(tiny.model.config.num_decoder_blocks) == [2, 1, 1]
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(tiny.model.decode(latents).sample, reference.decode(latents).sample)


def test_nan_from_a_reduced_precision_decode_is_decoded_again_in_fp32(sd1, monkeypatch):
    own = vae.original(sd1)
    real_decode = type(own).decode

    def flaky(self, z, *args, **kwargs):  # what SDXL's VAE does in fp16: overflow to NaN
        out = real_decode(self, z, *args, **kwargs)
        if self.dtype != torch.float32:
            out.sample[:] = float("nan")
        return out

    monkeypatch.setattr(type(own), "decode", flaky)
    dtype = own.dtype
    own.to(torch.bfloat16)
    try:
        image = generate(sd1, FAST, progress=False)[0]
    finally:
        own.to(dtype)
    assert any("fp32" in note for note in image.sdkit_notes)
    assert np.asarray(image).std() > 0, "a real picture, not a black one"


def test_tiled_decode_matches_the_whole_decode_closely(sd1):
    latents = torch.randn(1, 4, 160, 160, generator=torch.Generator().manual_seed(0))
    whole = np.asarray(vae.decode(sd1, latents, tiled=False)[0]).astype(int)
    tiled = np.asarray(vae.decode(sd1, latents, tiled=True)[0]).astype(int)
    assert whole.shape == tiled.shape
    assert np.abs(whole - tiled).mean() < 8, "tiles are blended at their seams"


def test_cli_generate_with_a_vae_records_it_as_a1111_does(sd1, tiny_files, tmp_path, capsys):
    from sdkit.__main__ import main
    from sdkit.metadata import read_parameters

    (tmp_path / "vae").mkdir()
    file = own_vae_file(tiny_files, tmp_path / "vae" / "tuned.safetensors", layout="bare", noise=0.05)
    main(["generate", "--model", str(tiny_files["sd1"]), "--prompt", "a cat", "--steps", "2", "--width", "32",
          "--height", "32", "--vae", str(file), "--out", str(tmp_path / "out"), "--quiet"])
    png = capsys.readouterr().out.strip().splitlines()[-1]
    extra = read_parameters(png).extra
    assert extra["VAE"] == "tuned" and extra["VAE hash"] == formats.sha256(file)[:10]
    vae.restore(sd1)
    main(["info", str(file), "--kind", "vae"])
    assert "latent_channels" in capsys.readouterr().out


def test_the_preview_uses_the_familys_tiny_decoder_when_the_folder_has_one(sd1, tmp_path, monkeypatch):
    from sdkit import preview

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sd1.__dict__.pop("_sdkit_tiny_decoder", None)
    linear = preview.show(sd1, latents)
    (tmp_path / "vae_approx").mkdir()
    reference = taesd_file(tmp_path / "vae_approx" / "taesd_decoder.pth", blocks=(1, 1, 1))
    monkeypatch.setenv("SDKIT_MODELS", str(tmp_path))
    sd1.__dict__.pop("_sdkit_tiny_decoder", None)
    tiny = preview.show(sd1, latents)
    sd1.__dict__.pop("_sdkit_tiny_decoder", None)
    assert tiny.size == (32, 32) and linear.size == (16, 16)  # the tiny decoder upsamples 4x, this VAE 2x
    with torch.no_grad():
        expected = ((reference.decode(latents).sample[0].clamp(-1, 1) + 1) * 127.5).round()
    difference = np.abs(np.asarray(tiny).astype(int) - expected.permute(1, 2, 0).numpy().astype(int))
    assert difference.mean() < 2, "the tiny decoder's picture (it runs in this machine's VAE dtype, fp32 here)"


def test_the_panel_group_swaps_the_vae_and_back(sd1, tiny_files, tmp_path):
    (tmp_path / "vae").mkdir()
    own_vae_file(tiny_files, tmp_path / "vae" / "tuned.safetensors", layout="bare", noise=0.05)
    group = vae.control_group(root=tmp_path, name="tuned")
    assert [v for _, v in group.choice.options][:2] == ["", "tuned"], "the own VAE first, then the root's files"
    before = pixels(sd1)
    group.prepare(sd1, FAST)
    assert vae.active(sd1) == "tuned"
    made = generate(sd1, FAST, progress=False)[0]
    group.choice.value = ""
    group.prepare(sd1, FAST)
    assert vae.active(sd1) == "" and np.array_equal(pixels(sd1), before)
    group.show(made.sdkit_settings)
    assert group.choice.value == "tuned", "an earlier picture's VAE comes back into the dropdown"
