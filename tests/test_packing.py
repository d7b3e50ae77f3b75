"""Packed convolution weights: the same numbers as PyTorch's own convolution, kept in step with the plain weight."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

from sdkit import checkpoints, packing
from sdkit.generate import GenerationSettings, generate

pytestmark = pytest.mark.skipif(not packing.available(), reason="this PyTorch has no oneDNN")


def block(dtype: torch.dtype = torch.bfloat16) -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(16, 8, 3, stride=2, padding=1), torch.nn.Conv2d(8, 4, 1))
    return model.to(dtype=dtype, memory_format=torch.channels_last).eval().requires_grad_(False)


def sample(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_convolutions_give_pytorchs_numbers_at_every_size(dtype):
    plain, packed = block(dtype), block(dtype)
    assert packing.pack(packed) == 3 and packing.is_packed(packed) and not packing.is_packed(plain)
    with torch.inference_mode():
        for shape in ((2, 8, 16, 16), (1, 8, 20, 12), (2, 8, 5, 7)):  # packed at the first, then other sizes
            x = sample(*shape, dtype=dtype)
            assert torch.equal(packed(x), plain(x))
    assert packed[0] in packing._PACKED  # the packed copy is held outside the module


def test_no_bias_grouped_and_contiguous_inputs_are_the_same_too():
    torch.manual_seed(1)
    plain = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1, bias=False), torch.nn.Conv2d(8, 8, 3, padding=1, groups=2))
    plain = plain.bfloat16().eval().requires_grad_(False)
    packed = copy.deepcopy(plain)
    packing.pack(packed)
    x = torch.randn(1, 4, 9, 9, dtype=torch.bfloat16)  # contiguous (NCHW), not channels-last
    with torch.inference_mode():
        assert torch.equal(packed(x), plain(x))


def test_unpack_puts_pytorchs_convolution_back_and_frees_the_copies():
    model = block()
    packing.pack(model)
    with torch.inference_mode():
        model(sample(1, 8, 8, 8))
    held = packing._PACKED[model[0]][1]
    packing.unpack(model, free=False)  # as `bench --packing` alternates: the copies kept
    assert not packing.is_packed(model) and packing._PACKED[model[0]][1] is held
    packing.pack(model)
    with torch.inference_mode():
        model(sample(1, 8, 8, 8))
    assert packing._PACKED[model[0]][1] is held  # not packed again
    packing.unpack(model)
    assert not packing.is_packed(model) and all(m not in packing._PACKED for m in model)
    assert all("forward" not in m.__dict__ for m in model)


def test_a_weight_changed_in_place_is_packed_again():
    plain, packed = block(), block()
    packing.pack(packed)
    x = sample(1, 8, 16, 16)
    with torch.inference_mode():
        before = packed(x)
        for model in (plain, packed):  # as a LoRA merge writes into the weight
            model[0].weight.copy_(model[0].weight * 1.5)
        after = packed(x)
        assert not torch.equal(after, before) and torch.equal(after, plain(x))


def test_a_copy_packs_its_own_weights_and_a_trace_sees_plain_convolutions():
    packed = block()
    packing.pack(packed)
    x = sample(1, 8, 16, 16)
    with torch.inference_mode():
        packed(x)
    twin = copy.deepcopy(packed).float()  # as the OpenVINO conversion copies the UNet to fp32
    with torch.inference_mode():
        assert torch.allclose(twin(x.float()), packed(x).float(), atol=0.05)
    assert twin[0].forward.__self__ is twin[0]
    graph = torch.jit.trace(twin, x.float()).inlined_graph
    assert "aten::_convolution" in str(graph) and "mkldnn" not in str(graph)


def test_training_runs_the_plain_convolution():
    model = block(torch.float32).train().requires_grad_(True)
    packing.pack(model)
    model(sample(1, 8, 8, 8, dtype=torch.float32)).sum().backward()
    assert model[0].weight.grad is not None and model[0] not in packing._PACKED


def test_gradients_reach_the_input_through_a_frozen_packed_model():
    model = block(torch.float32)  # frozen, as the UNet is while an embedding trains
    packing.pack(model)
    x = sample(1, 8, 8, 8, dtype=torch.float32).requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_it_is_wanted_only_on_a_cpu_with_the_memory_to_spare(monkeypatch):
    model = block()
    assert packing.wanted(model, device="cpu")[0]
    assert not packing.wanted(model, device="cuda")[0]
    monkeypatch.setattr("psutil.virtual_memory", lambda: type("M", (), {"available": 2**30})())
    ok, why = packing.wanted(model, device="cpu")
    assert not ok and "leave under 2 GiB of 1.0 free" in why
    monkeypatch.setenv("SDKIT_PACK", "0")
    assert packing.wanted(model, device="cpu") == (False, "SDKIT_PACK=0") and "SDKIT_PACK=0" in packing.describe()


def test_a_loaded_unet_is_packed_and_draws_the_same_pixels(tiny_files, monkeypatch, tmp_path):
    settings = GenerationSettings(prompt="a red circle", seed=3, steps=3, width=32, height=32)
    monkeypatch.setenv("SDKIT_FUSE", "0")  # fused blocks round differently (tests/test_fusion.py)
    packed = checkpoints.load(tiny_files["sd1"])
    assert packing.is_packed(packed.unet) and not packing.is_packed(packed.vae)
    monkeypatch.setenv("SDKIT_PACK", "0")
    plain = checkpoints.load(shutil.copy(tiny_files["sd1"], tmp_path / "plain.safetensors"))  # another file: not cached
    assert not packing.is_packed(plain.unet)
    pictures = [np.asarray(generate(pipe, settings, progress=False)[0]) for pipe in (packed, plain)]
    assert np.array_equal(*pictures)
