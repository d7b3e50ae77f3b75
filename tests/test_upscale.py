"""sdkit.upscale: upscale models in their real layouts through spandrel, tiled, refused when they are not upscalers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdkit import metadata, upscale
from sdkit.errors import SdkitError
from sdkit.testing import write_upscaler


def picture(width: int = 40, height: int = 30, *, seed: int = 0) -> Image.Image:
    """A smooth random picture (noise blurred), so tiles meet on gradients rather than on white noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 5 + 1, width // 5 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("kind, suffix, architecture", [("compact", ".safetensors", "RealESRGAN Compact"),
                                                        ("esrgan", ".pth", "ESRGAN"),
                                                        ("esrgan-new", ".pth", "ESRGAN"),
                                                        ("swinir", ".safetensors", "SwinIR")])
def test_every_layout_loads_through_spandrel_and_enlarges(tmp_path, kind, suffix, architecture):
    path = write_upscaler(kind, tmp_path / f"tiny-{kind}{suffix}", scale=2 if kind == "swinir" else 4)
    model = upscale.load(path)
    assert model.architecture == architecture and model.name == f"tiny-{kind}"
    big = upscale.upscale(model, picture(), progress=False)
    assert big.size == (40 * model.scale, 30 * model.scale) and big.mode == "RGB"


def test_tiles_blend_into_the_same_picture_as_one_piece(tmp_path):
    model = upscale.load(write_upscaler("compact", tmp_path / "c.safetensors"))
    model.model.to(torch.float32)  # compare the blending, not bf16 rounding
    source = picture(160, 120)
    whole = np.asarray(upscale.upscale(model, source, tile=512, progress=False)).astype(int)
    tiled = np.asarray(upscale.upscale(model, source, tile=64, overlap=16, progress=False)).astype(int)
    assert upscale.tile_count(160, 120, tile=64, overlap=16) == 9
    assert np.abs(whole - tiled).mean() < 0.5 and np.abs(whole - tiled).max() <= 8


@pytest.mark.parametrize("tile, overlap", [(0, 32), (32, 8), (512, -1)])
def test_unusable_tiles_are_refused(tmp_path, tile, overlap):
    model = upscale.load(write_upscaler("compact", tmp_path / "c.safetensors"))
    with pytest.raises(SdkitError, match=f"tile={tile}, overlap={overlap}"):
        upscale.upscale(model, picture(), tile=tile, overlap=overlap, progress=False)


def test_tile_starts_cover_the_side_with_the_overlap():
    for length in (1, 100, 512, 513, 1000, 1024, 2048):
        starts = upscale.starts(length, 512, 32)
        assert starts[0] == 0 and starts[-1] + 512 >= length > starts[-1] + 32 * (len(starts) > 1)
        assert all(b - a == 512 - 32 for a, b in zip(starts, starts[1:])), "neighbours share exactly 32 px"
    assert upscale.starts(1024, 512, 32) == [0, 480, 960], "ComfyUI's steps: the last tile is 64 px, not a third 512"


def test_a_file_that_is_not_an_upscaler_is_refused_with_spandrels_reason(tmp_path, tiny_files):
    from sdkit import formats

    vae_tensors = {k.removeprefix("first_stage_model."): v.contiguous()
                   for k, v in formats.load_state_dict(tiny_files["sd1"]).items() if k.startswith("first_stage_model.")}
    save_file(vae_tensors, str(tmp_path / "a-vae.safetensors"))
    with pytest.raises(SdkitError, match=r"a-vae.safetensors is not an upscale model.*a VAE") as error:
        upscale.load(tmp_path / "a-vae.safetensors")
    assert "none of spandrel's" in str(error.value) and "recognises its tensor names" in str(error.value)
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(SdkitError, match="odd.safetensors is not an upscale model"):
        upscale.load(tmp_path / "odd.safetensors")


def test_a_pickle_that_would_run_code_is_refused_before_spandrel_sees_it(tmp_path):
    import pickle

    marker = tmp_path / "ran.txt"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"body.0.weight": Payload()}))
    with pytest.raises(SdkitError, match="refused|not a PyTorch"):
        upscale.load(path)
    assert not marker.exists()


def test_upscale_file_writes_a_new_png_with_the_text_and_never_overwrites(tmp_path):
    model = upscale.load(write_upscaler("compact", tmp_path / "x4.safetensors"))
    from sdkit.generate import GenerationSettings

    source = metadata.save_image_as(picture(), path=tmp_path / "cat.png", settings=GenerationSettings(prompt="a cat"))
    before = source.read_bytes()
    first = upscale.upscale_file(source, model, progress=False)
    second = upscale.upscale_file(source, model, progress=False)
    assert first.name == "cat-x4.png" and second.name == "cat-x4-1.png"
    with pytest.raises(SdkitError, match="already exists"):
        upscale.upscale_file(source, model, out=first, progress=False)
    assert source.read_bytes() == before
    info = Image.open(first).info
    assert info["parameters"] == Image.open(source).info["parameters"]
    assert info["postprocessing"] == "Postprocess upscale by: 4, Postprocess upscaler: x4"
    assert metadata.read_parameters(first).prompt == "a cat"
    assert Image.open(first).size == (160, 120)


def test_missing_or_unreadable_images_are_refused(tmp_path):
    model = upscale.load(write_upscaler("compact", tmp_path / "x4.safetensors"))
    with pytest.raises(SdkitError, match="does not exist"):
        upscale.upscale_file(tmp_path / "none.png", model, progress=False)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(SdkitError, match="not an image"):
        upscale.upscale_file(tmp_path / "text.png", model, progress=False)
