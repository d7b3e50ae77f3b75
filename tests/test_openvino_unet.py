from __future__ import annotations

import copy

import pytest
import torch

from sdkit import checkpoints, device, openvino_unet
from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings, generate
from sdkit.quality import psnr

SHAPES = GenerationSettings(prompt="a red circle on a white background", seed=3, steps=8, width=64, height=64)


def load(monkeypatch, *, backend: str, dtype: str = "float32"):
    """shapes-v1 loaded with the UNet engine and dtype forced (fp32: both engines then agree to rounding)."""
    monkeypatch.setenv("SDKIT_DTYPE", dtype)
    monkeypatch.setenv("SDKIT_BACKEND", backend)
    return checkpoints.load("shapes-v1")


def test_the_converted_unet_predicts_pytorchs_noise(monkeypatch):
    pipe = load(monkeypatch, backend="pytorch")
    made = openvino_unet.Engine(pipe.unet, dtype="float32")
    torch.manual_seed(0)
    sample, context = torch.randn(2, 4, 8, 12), torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    with torch.inference_mode():
        expected = pipe.unet(sample, 500, context).sample
    got = made(sample, torch.tensor([500.0]), context)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()
    dim = pipe.unet.config.cross_attention_dim
    for side in (16, 10, 16, 24):  # other sizes: compiled for each, the two last used kept
        odd = torch.randn(1, 4, side, side)  # 10: not a multiple of the UNet's 4x downsampling, as a 600-px side
        with torch.inference_mode():
            expected = pipe.unet(odd, 10, context[:1]).sample
        assert (made(odd, torch.tensor([10.0]), context[:1]) - expected).abs().max() < 1e-3 * expected.abs().max()
    assert list(made.compiled) == [((1, 4, 16, 16), (1, 77, dim)), ((1, 4, 24, 24), (1, 77, dim))]


def test_in_bf16_it_is_as_close_to_fp32_as_pytorchs_bf16(monkeypatch):
    pipe = load(monkeypatch, backend="pytorch")
    half = copy.deepcopy(pipe.unet).to(torch.bfloat16)
    made = openvino_unet.Engine(half, dtype="bfloat16")  # an fp32 copy is traced, its weights then kept in fp16
    torch.manual_seed(0)
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    with torch.inference_mode():
        bf16 = half(sample.bfloat16(), 500, context.bfloat16()).sample.float()
        fp32 = pipe.unet(sample, 500, context).sample
    got = made(sample.bfloat16(), torch.tensor([500.0]), context.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float() - fp32).abs().max() <= 2 * (bf16 - fp32).abs().max()


def test_a_picture_from_openvino_is_pytorchs_picture(monkeypatch):
    reference = generate(load(monkeypatch, backend="pytorch"), SHAPES, progress=False)[0]
    pipe = load(monkeypatch, backend="openvino")
    first = generate(pipe, SHAPES, progress=False)[0]  # converts: the tracer runs PyTorch's UNet, the steps do not
    torch_ran = []
    hook = pipe.unet.conv_in.register_forward_hook(lambda *_: torch_ran.append(1))  # inside PyTorch's UNet only
    try:
        again = generate(pipe, SHAPES, progress=False)[0]
    finally:
        hook.remove()
    assert not torch_ran
    assert psnr(first, reference) > 40
    assert any("converted for OpenVINO for this model" in note for note in first.sdkit_notes)
    assert not any("OpenVINO" in note for note in again.sdkit_notes)  # the conversion is kept: no second one
    assert psnr(again, first) == float("inf")


def test_a_lora_picture_runs_in_pytorch_and_the_conversion_is_kept(monkeypatch):
    styled = SHAPES.replace(prompt=SHAPES.prompt + " <lora:outlines:1>")
    reference = generate(load(monkeypatch, backend="pytorch"), styled, progress=False)[0]
    pipe = load(monkeypatch, backend="openvino")
    plain = generate(pipe, SHAPES, progress=False)[0]
    with_lora = generate(pipe, styled, progress=False)[0]
    assert any("not with LoRAs" in note for note in with_lora.sdkit_notes)
    assert psnr(with_lora, reference) > 40 and psnr(with_lora, plain) < 30  # the LoRA shows
    after = generate(pipe, SHAPES, progress=False)[0]  # the LoRA is off again: the first conversion still serves
    assert not any("OpenVINO" in note for note in after.sdkit_notes) and psnr(after, plain) == float("inf")


@pytest.mark.parametrize("change,named", [({"deep_cache": 2}, "DeepCache"), ({"token_merging": 0.5}, "token merging")])
def test_fast_mode_runs_in_pytorch_and_says_so(monkeypatch, change, named):
    pipe = load(monkeypatch, backend="openvino")
    calls = []
    hook = pipe.unet.conv_in.register_forward_hook(lambda *_: calls.append(1))  # inside PyTorch's UNet only
    try:
        image = generate(pipe, SHAPES.replace(**change), progress=False)[0]
    finally:
        hook.remove()
    assert calls
    assert any(f"not with {named}" in note for note in image.sdkit_notes)


def test_an_sdxl_picture_runs_in_pytorch_and_says_so(monkeypatch, tiny_files):
    monkeypatch.setenv("SDKIT_BACKEND", "openvino")
    pipe = checkpoints.load(tiny_files["sdxl"])
    image = generate(pipe, SHAPES.replace(steps=2), progress=False)[0]
    assert any("not with SDXL's extra conditioning" in note for note in image.sdkit_notes)
    assert "_sdkit_openvino" not in pipe.__dict__  # nothing was converted


def test_without_the_memory_to_convert_it_runs_in_pytorch_and_says_so(monkeypatch):
    pipe = load(monkeypatch, backend="openvino")
    pipe.__dict__.pop("_sdkit_openvino", None)  # not converted yet
    assert 0 < openvino_unet.memory_needed_gib(pipe.unet) < 1  # shapes-v1 is small
    monkeypatch.setattr(openvino_unet, "memory_needed_gib", lambda unet: 1e6)  # more than any machine has free
    image = generate(pipe, SHAPES, progress=False)[0]
    assert any("converting it needs about 1000000.0 GiB and" in note for note in image.sdkit_notes)
    assert not openvino_unet.converted(pipe)
    monkeypatch.setattr(openvino_unet, "memory_needed_gib", lambda unet: 0.0)
    generate(pipe, SHAPES, progress=False)
    assert openvino_unet.converted(pipe)


def test_calls_it_does_not_take_run_in_pytorch(monkeypatch):
    pipe = load(monkeypatch, backend="pytorch")
    dim = pipe.unet.config.cross_attention_dim
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, dim)
    with torch.inference_mode(), openvino_unet.running(pipe, on=True) as calls:
        plain = pipe.unet(sample, 500, encoder_hidden_states=context).sample
        pipe.unet(sample, 500, encoder_hidden_states=context, cross_attention_kwargs={"scale": 1.0})
        pipe.unet(sample.expand(2, -1, -1, -1), torch.tensor([1, 2]), encoder_hidden_states=context.expand(2, -1, -1))
    assert calls == {"openvino": 1, "pytorch": 2}
    assert "forward" not in pipe.unet.__dict__  # the UNet's own forward is back
    with torch.inference_mode():
        assert (pipe.unet(sample, 500, encoder_hidden_states=context).sample - plain).abs().max() < 1e-3


def test_an_openvino_failure_is_one_line_with_the_way_back(monkeypatch):
    pipe = load(monkeypatch, backend="openvino")

    def broken(*_args):
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:112:\nunsupported")

    monkeypatch.setattr(openvino_unet.Engine, "__call__", broken)
    with pytest.raises(SdkitError, match="OpenVINO could not run the UNet at .*RuntimeError: Exception from") as info:
        generate(pipe, SHAPES, progress=False)
    assert "SDKIT_BACKEND=pytorch" in info.value.fix
    assert "forward" not in pipe.unet.__dict__  # PyTorch's forward is back for the next picture


def test_sdkit_backend_names_the_engine_or_says_what_to_do(monkeypatch):
    monkeypatch.setenv("SDKIT_BACKEND", "openvino")
    assert device.choose(device.report())["unet"].backend == "openvino"
    assert "set by SDKIT_BACKEND" in device.choose(device.report())["unet"].reason
    monkeypatch.setenv("SDKIT_BACKEND", "onnx")
    with pytest.raises(SdkitError, match="SDKIT_BACKEND='onnx'"):
        device.choose(device.report())
    monkeypatch.setenv("SDKIT_BACKEND", "openvino")
    monkeypatch.setattr(openvino_unet, "installed", lambda: False)
    with pytest.raises(SdkitError, match="openvino package is not installed"):
        device.choose(device.report())


def test_a_profiled_call_splits_its_time_by_operator_kind(monkeypatch):
    pipe = load(monkeypatch, backend="pytorch")
    made = openvino_unet.Engine(pipe.unet, dtype="float32", profile=True)
    sample, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    spent = made.kinds(sample, torch.tensor([500.0]), context)
    assert set(spent) == {"convolution", "matmul", "attention", "other", "between"}
    assert spent["convolution"] > 0 and spent["attention"] > 0 and spent["matmul"] > 0
    assert openvino_unet._kind("Subgraph", "x/attn1/Softmax_3,Multiply_2") == "attention"
    assert openvino_unet._kind("Subgraph", "norm1/GroupNormalization,silu/Swish") == "other"
