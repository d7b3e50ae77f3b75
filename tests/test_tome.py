from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdkit import checkpoints, tome
from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings, generate
from sdkit.metadata import format_parameters, parse_parameters

SHAPES = GenerationSettings(prompt="a red circle on a white background", negative_prompt="blurry", seed=3, steps=6,
                            width=64, height=64)


@pytest.fixture(scope="module")
def shapes():
    return checkpoints.load("shapes-v1")


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 12), width=st.integers(1, 12), ratio=st.floats(0.0, tome.MAX_RATIO))
def test_merge_drops_that_share_of_tokens_and_unmerge_puts_every_one_back(height, width, ratio):
    x = torch.randn(2, height * width, 8, generator=torch.Generator().manual_seed(height * 13 + width))
    merge, unmerge = tome.matching(x, height=height, width=width, ratio=ratio)
    kept = (height // 2) * (width // 2)
    merges = max(0, min(int(height * width * ratio), height * width - kept)) if kept else 0
    assert merge(x).shape == (2, height * width - merges, 8)
    assert unmerge(merge(x)).shape == x.shape
    changed = (unmerge(merge(x)) != x).any(dim=-1).sum(dim=-1)
    assert (changed <= 2 * merges).all()  # only merged tokens and the kept ones they joined differ


def test_equal_tokens_merge_without_loss():
    cells = torch.randn(1, 9, 16)  # a 6x6 picture of 2x2 cells, each cell one token value
    grid = cells.view(1, 3, 3, 16).repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(1, 36, 16)
    merge, unmerge = tome.matching(grid, height=6, width=6, ratio=tome.MAX_RATIO)
    assert merge(grid).shape[1] == 9
    assert torch.allclose(unmerge(merge(grid)), grid, atol=1e-6)


def test_nothing_to_merge_is_the_identity():
    x = torch.randn(1, 4, 3)
    merge, unmerge = tome.matching(x, height=2, width=2, ratio=0.0)
    assert merge(x) is x and unmerge(x) is x


def _attention_tokens(unet) -> tuple[list, list]:
    """Hooks recording the token count each self-attention of the largest attention level computes with."""
    seen: list[int] = []
    levels = tome._attention_levels(unet)
    top = min(factor for factor, _ in levels)
    hooks = [block.attn1.to_q.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
             for factor, block in levels if factor == top]
    return seen, hooks


def test_generate_merges_the_largest_self_attention_and_repeats_a_seed(shapes):
    plain = generate(shapes, SHAPES, progress=False)[0]
    seen, hooks = _attention_tokens(shapes.unet)
    try:
        merged = generate(shapes, SHAPES.replace(token_merging=0.5), progress=False)[0]
    finally:
        for hook in hooks:
            hook.remove()
    again = generate(shapes, SHAPES.replace(token_merging=0.5), progress=False)[0]
    assert seen and set(seen) == {8 * 8 // 2}  # shapes-v1 at 64 px: attention at 8x8 tokens, half merged
    assert np.array_equal(np.asarray(merged), np.asarray(again))  # no randomness in which tokens merge
    assert not np.array_equal(np.asarray(merged), np.asarray(plain))
    assert "merged" in merged.sdkit_notes[-1]
    assert all("forward" not in block.attn1.__dict__ for _, block in tome._attention_levels(shapes.unet))


def test_sdxl_merges_at_its_first_attention_level(tiny_files):
    pipe = checkpoints.load(tiny_files["sdxl"])
    levels = tome._attention_levels(pipe.unet)
    assert min(factor for factor, _ in levels) == 2  # SDXL's first down block has no attention
    seen, hooks = _attention_tokens(pipe.unet)
    try:
        generate(pipe, GenerationSettings(prompt="a cat", seed=1, steps=2, width=32, height=32, token_merging=0.5),
                 progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    tokens = (32 // pipe.vae_scale_factor // 2) ** 2
    assert seen and set(seen) == {tokens - tokens // 2}


def test_hires_pass_merges_at_its_own_size(shapes):
    seen, hooks = _attention_tokens(shapes.unet)
    try:
        image = generate(shapes, SHAPES.replace(token_merging=0.5, hires_scale=2.0, strength=0.5, steps=4),
                         progress=False)[0]
    finally:
        for hook in hooks:
            hook.remove()
    assert image.size == (128, 128)
    assert set(seen) == {32, 128}  # 8x8 then 16x16 tokens, half of each merged


def test_written_and_read_back_as_a1111_writes_it():
    text = format_parameters(SHAPES.replace(token_merging=0.5))
    assert "Token merging ratio: 0.5" in text
    assert parse_parameters(text).token_merging == 0.5
    assert "Token merging" not in format_parameters(SHAPES)


@pytest.mark.parametrize("value, words", [(1.2, r"outside 0\.\.1"), (-0.1, "outside"), (float("nan"), "finite")])
def test_a_ratio_no_run_can_use_is_refused(value, words):
    with pytest.raises(SdkitError, match=words):
        SHAPES.replace(token_merging=value).check()


def test_an_a1111_ratio_over_three_quarters_merges_as_much_as_tomesd_allows(shapes):
    settings = parse_parameters(format_parameters(SHAPES.replace(token_merging=0.9)))
    assert settings.token_merging == 0.9
    settings.check()
    seen, hooks = _attention_tokens(shapes.unet)
    try:
        generate(shapes, settings, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert set(seen) == {(8 // 2) ** 2}  # every 2x2 cell down to its kept token: 64 -> 16


def test_nested_merging_puts_each_forward_back(shapes):
    block = tome._attention_levels(shapes.unet)[0][1]
    with tome.token_merging(shapes.unet, ratio=0.5):
        outer = block.attn1.forward
        with tome.token_merging(shapes.unet, ratio=0.25):
            assert block.attn1.forward is not outer
        assert block.attn1.forward is outer
    assert "forward" not in block.attn1.__dict__


def test_matching_uses_the_blocks_input_not_the_attentions():
    """tomesd (and so A1111) match tokens on the transformer block's input, before its norm."""
    seen = []
    real = tome.matching

    def spy(metric, **kwargs):
        seen.append(metric)
        return real(metric, **kwargs)

    unet = checkpoints.load("shapes-v1").unet
    block = tome._attention_levels(unet)[0][1]
    inputs = []
    hook = block.register_forward_pre_hook(lambda _m, args, kwargs: inputs.append(
        args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        tome.matching = spy
        with tome.token_merging(unet, ratio=0.5), torch.inference_mode():
            unet(torch.randn(2, 4, 16, 16, dtype=unet.dtype), 500,
                 torch.randn(2, 77, unet.config.cross_attention_dim, dtype=unet.dtype))
    finally:
        tome.matching = real
        hook.remove()
    assert any(metric is inputs[0] for metric in seen)
