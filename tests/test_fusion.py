"""Fused UNet blocks: diffusers' numbers (to bf16 rounding), diffusers' own forwards wherever fusing cannot run."""

from __future__ import annotations

import copy

import pytest
import torch

from sdkit import bench, checkpoints, fusion, packing
from sdkit.generate import GenerationSettings, generate
from sdkit.testing import tiny_pipeline

pytestmark = pytest.mark.skipif(not packing.available(), reason="this PyTorch has no oneDNN")


def unet(family: str = "sd1", dtype: torch.dtype = torch.float32, *, fused: bool = True) -> torch.nn.Module:
    model = tiny_pipeline(family).unet.to(dtype=dtype, memory_format=torch.channels_last).eval().requires_grad_(False)
    if fused:
        packing.pack(model)
        fusion.fuse(model)
    return model


def inputs(family: str = "sd1", dtype: torch.dtype = torch.float32, *, timesteps=(500.0,)) -> dict:
    torch.manual_seed(1)
    width = {"sd1": 32, "sd2": 64}[family]
    sample = torch.randn(2, 4, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return {"sample": sample, "timestep": torch.tensor(timesteps), "encoder_hidden_states": torch.randn(2, 7, width, dtype=dtype)}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("timesteps", [(500.0,), (500.0, 20.0)])  # one timestep for the batch (a bias), or one each
def test_fused_unet_gives_diffusers_numbers_in_fp32(timesteps):
    fused, plain = unet(), unet(fused=False)
    counts = {cls.__name__: sum(type(m) is cls for m in fused.modules()) for cls in fusion._stand_ins()}
    assert fusion.fuse(copy.deepcopy(plain)) == sum(counts.values()) and all(counts.values()), counts
    assert fusion.is_fused(fused) and not fusion.is_fused(plain)
    with torch.inference_mode():
        got, want = (m(**inputs(timesteps=timesteps)).sample for m in (fused, plain))
    assert relative(got, want) < 1e-5


@pytest.mark.parametrize("family", ["sd1", "sd2"])  # 1x1-convolution and linear projections
def test_in_inference_no_stand_in_falls_back_to_diffusers_own(family, monkeypatch):
    model = unet(family, torch.bfloat16)
    for cls, (attribute, _) in fusion._stand_ins().items():
        monkeypatch.setattr(cls, attribute, lambda *a, **k: pytest.fail("a stand-in ran diffusers' own forward"))
    with torch.inference_mode():
        assert model(**inputs(family, torch.bfloat16)).sample.isfinite().all()


def test_in_bf16_fused_is_no_further_from_fp32_than_unfused():
    reference = unet(fused=False)
    with torch.inference_mode():
        want = reference(**inputs()).sample
        got = {fused: unet(dtype=torch.bfloat16, fused=fused)(**inputs(dtype=torch.bfloat16)).sample for fused in (True, False)}
    assert relative(got[True], want) <= 1.1 * relative(got[False], want), (relative(got[True], want), relative(got[False], want))


def test_linear_projection_blocks_of_sd2_give_diffusers_numbers_too():
    fused, plain = unet("sd2"), unet("sd2", fused=False)
    with torch.inference_mode():
        assert relative(fused(**inputs("sd2")).sample, plain(**inputs("sd2")).sample) < 1e-5


def test_a_weight_changed_in_place_reaches_the_fused_geglu():
    fused, plain = unet(), unet(fused=False)
    with torch.inference_mode():
        before = fused(**inputs()).sample
        for model in (fused, plain):  # as a LoRA merge writes into the weight
            proj = next(m for m in model.modules() if type(m).__name__ == "GEGLU").proj
            proj.weight.copy_(proj.weight * 1.5)
        after = fused(**inputs()).sample
        assert relative(after, before) > 1e-3 and relative(after, plain(**inputs()).sample) < 1e-5


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_training_and_traces_run_diffusers_own_forwards():
    fused = unet()
    x = inputs()
    x["sample"].requires_grad_(True)  # gradients through the frozen UNet, as while an embedding trains
    fused(**x).sample.sum().backward()
    assert x["sample"].grad.abs().sum() > 0
    with torch.no_grad():  # as the OpenVINO conversion traces
        graph = str(torch.jit.trace(fused, tuple(inputs().values()), strict=False).inlined_graph)
    assert "aten::_convolution" in graph and "mkldnn" not in graph


def test_unfuse_and_the_opt_out(monkeypatch):
    model = unet()
    fusion.unfuse(model)
    assert not fusion.is_fused(model)
    assert all("forward" not in m.__dict__ for m in model.modules() if type(m).__name__ in ("GEGLU", "ResnetBlock2D"))
    assert fusion.wanted(device="cpu") and not fusion.wanted(device="cuda")
    monkeypatch.setenv("SDKIT_FUSE", "0")
    assert not fusion.wanted(device="cpu") and "SDKIT_FUSE=0" in fusion.describe()


def test_a_loaded_unet_is_fused_and_draws_nearly_the_same_pixels(tiny_files, monkeypatch, tmp_path):
    settings = GenerationSettings(prompt="a red circle", seed=3, steps=3, width=32, height=32)
    fused = checkpoints.load(tiny_files["sd1"])
    monkeypatch.setenv("SDKIT_FUSE", "0")
    plain = checkpoints.load(tiny_files["sd1"])  # the opt-out is part of the cache key: loaded again
    assert fused is not plain and fusion.is_fused(fused.unet) and not fusion.is_fused(plain.unet)
    pictures = [generate(pipe, settings, progress=False)[0] for pipe in (fused, plain)]
    assert bench.psnr(*pictures) > 35, bench.psnr(*pictures)  # bf16 rounding on random weights, not another picture
