from __future__ import annotations

import numpy as np
import pytest

from sdkit import checkpoints, fast
from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings, generate
from sdkit.metadata import format_parameters, parse_parameters
from sdkit.quality import psnr

SHAPES = GenerationSettings(prompt="a red circle on a white background", negative_prompt="blurry", seed=3, steps=12,
                            width=64, height=64)


@pytest.fixture(scope="module")
def shapes():
    return checkpoints.load("shapes-v1")


class Batches:
    """Records the batch size and spatial size of every UNet call, and which deep blocks ran."""

    def __init__(self, unet) -> None:
        self.calls: list[tuple[int, ...]] = []
        self.deep_runs = 0
        self.hooks = [unet.register_forward_pre_hook(lambda _m, args: self.calls.append(tuple(args[0].shape))),
                      unet.mid_block.resnets[0].register_forward_hook(self._deep)]  # inside: skipped when cached

    def _deep(self, *_args) -> None:
        self.deep_runs += 1

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def test_off_by_default_is_the_same_picture(shapes):
    plain = generate(shapes, SHAPES, progress=False)[0]
    off = generate(shapes, SHAPES.replace(**fast.OFF), progress=False)[0]
    assert np.array_equal(np.asarray(plain), np.asarray(off))
    assert not any(note.startswith("Fast mode") for note in off.sdkit_notes)


def test_deep_cache_runs_the_deep_blocks_every_nth_step_only(shapes):
    watch = Batches(shapes.unet)
    try:
        image = generate(shapes, SHAPES.replace(deep_cache=3), progress=False)[0]
    finally:
        watch.close()
    assert len(watch.calls) == 12  # one (CFG-batched) UNet call per euler_a step
    assert watch.deep_runs == 4  # calls 0, 3, 6, 9
    assert "DeepCache" in image.sdkit_notes[-1]
    for block in (shapes.unet.mid_block, *shapes.unet.down_blocks, *shapes.unet.up_blocks):
        assert "forward" not in block.__dict__  # the stand-ins are gone after the run


def test_cfg_until_halves_the_batch_after_that_share_of_steps(shapes):
    watch = Batches(shapes.unet)
    try:
        generate(shapes, SHAPES.replace(cfg_until=0.5), progress=False)
    finally:
        watch.close()
    assert [shape[0] for shape in watch.calls] == [2] * 6 + [1] * 6


def test_fast_mode_keeps_the_subject_and_says_what_it_traded(shapes):
    from sdkit.shapes.detect import detect

    psnrs = []
    for prompt in ("a red circle on a white background", "a blue triangle on a black background",
                   "a yellow square on a black background"):
        full = generate(shapes, SHAPES.replace(prompt=prompt, steps=20), progress=False)[0]
        quick = generate(shapes, fast.apply(SHAPES.replace(prompt=prompt, steps=20)), progress=False)[0]
        assert quick.sdkit_settings.steps == 10 and quick.sdkit_settings.sampler == "dpmpp_2m"
        assert "DeepCache" in quick.sdkit_notes[-1] and "CFG" in quick.sdkit_notes[-1]
        seen, wanted = detect(quick), detect(full)
        assert (seen.shape, seen.colour, seen.background) == (wanted.shape, wanted.colour, wanted.background)
        psnrs.append(psnr(full, quick))
    assert 10 < float(np.median(psnrs)) < 40  # a different picture of the same thing, not the same pixels


def test_hires_pass_starts_a_new_cache(shapes):
    watch = Batches(shapes.unet)
    try:
        image = generate(shapes, SHAPES.replace(deep_cache=2, hires_scale=1.5, strength=0.5, steps=6), progress=False)[0]
    finally:
        watch.close()
    assert image.size == (96, 96)
    sizes = [shape[-1] for shape in watch.calls]
    assert sizes == [16] * 6 + [24] * 3
    assert watch.deep_runs == 3 + 2  # first pass calls 0, 2, 4; hires pass (a new shape) calls 0, 2


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_cfg_stop_on_the_real_pipelines(tiny_files, family):
    pipe = checkpoints.load(tiny_files[family])
    settings = GenerationSettings(prompt="a cat", negative_prompt="blurry", seed=1, steps=4, width=32, height=32)
    watch = []
    hook = pipe.unet.register_forward_pre_hook(lambda _m, args: watch.append(args[0].shape[0]))
    try:
        image = generate(pipe, settings.replace(cfg_until=0.5, deep_cache=2), progress=False)[0]
    finally:
        hook.remove()
    assert watch == [2, 2, 1, 1]
    assert image.size == (32, 32)


def test_cfg_stop_with_a_controlnet(shapes):
    from sdkit.controlnet import Unit
    from sdkit.shapes import data
    from sdkit.shapes.controls import control_image

    spec = data.ShapeSpec(shape="square", colour="red", background="white", size=0.4, cx=0.3, cy=0.3)
    unit = Unit(model="shapes-v1-layout", picture=control_image(spec, kind="blob"))
    watch = []
    hook = shapes.unet.register_forward_pre_hook(lambda _m, args: watch.append(args[0].shape[0]))
    try:
        generate(shapes, SHAPES.replace(controlnets=(unit,), steps=4, cfg_until=0.5), progress=False)
    finally:
        hook.remove()
    assert watch == [2, 2, 1, 1]


def test_written_and_read_back_in_the_png_text():
    settings = SHAPES.replace(deep_cache=3, cfg_until=0.5)
    text = format_parameters(settings)
    assert "DeepCache: 3, CFG until: 0.5" in text
    back = parse_parameters(text)
    assert (back.deep_cache, back.cfg_until) == (3, 0.5)
    assert "DeepCache" not in format_parameters(SHAPES)


@pytest.mark.parametrize("change, words", [({"deep_cache": 0}, "deep_cache=0"), ({"deep_cache": 11}, "at most 10"),
                                           ({"cfg_until": 1.5}, "cfg_until=1.5"),
                                           ({"cfg_until": float("nan")}, "finite")])
def test_bad_fast_settings_are_refused(change, words):
    with pytest.raises(SdkitError, match=words):
        SHAPES.replace(**change).check()


def test_describe_names_each_trade():
    assert fast.describe(**fast.OFF) == ""
    line = fast.describe(**fast.FAST)
    assert "every 2 steps" in line and "50%" in line


def test_apply_halves_the_steps_but_not_below_the_minimum():
    assert fast.apply(SHAPES.replace(steps=20)).steps == 10
    assert fast.apply(SHAPES.replace(steps=9)).steps == fast.MIN_STEPS
    assert fast.apply(SHAPES.replace(steps=6)).steps == 6  # already few: left as is
    assert fast.apply(SHAPES, fewer_steps=False).steps == SHAPES.steps


def test_panel_group_switch_sets_every_trade_and_writes_the_settings():
    group = fast.control_group()
    assert group.update(SHAPES) == SHAPES.replace(**fast.OFF)
    group.switch.value = True
    assert (group.interval.value, group.until.value, group.fewer.value) == (2, 0.5, True)
    assert "DeepCache" in group.trades.value and "half the steps" in group.trades.value
    assert group.update(SHAPES.replace(steps=20)) == fast.apply(SHAPES.replace(steps=20))
    group.show(fast.apply(SHAPES.replace(steps=20)))  # an earlier fast picture: its 10 steps are not halved again
    assert group.fewer.value is False and group.switch.value is True
    assert group.update(SHAPES.replace(steps=10)).steps == 10


def test_sdxl_controlnet_stops_cfg_too(tiny_files, tmp_path):
    from PIL import Image

    from sdkit.controlnet import Unit
    from sdkit.testing import write_controlnet

    sdxl = checkpoints.load(tiny_files["sdxl"])
    write_controlnet(sdxl, tmp_path / "xl.safetensors")
    Image.new("RGB", (32, 32), "white").save(tmp_path / "c.png")
    unit = Unit(model=str(tmp_path / "xl.safetensors"), image=str(tmp_path / "c.png"))
    settings = GenerationSettings(prompt="a cat", negative_prompt="blurry", seed=1, steps=4, width=32, height=32,
                                  controlnets=(unit,), cfg_until=0.5, deep_cache=2)
    watch = []
    hook = sdxl.unet.register_forward_pre_hook(lambda _m, args: watch.append(args[0].shape[0]))
    try:
        image = generate(sdxl, settings, progress=False)[0]
    finally:
        hook.remove()
    assert watch == [2, 2, 1, 1]  # the control image's negative half is dropped with the prompt's
    assert image.size == (32, 32) and fast.KEPT_CFG not in image.sdkit_notes


def test_a_pipeline_that_cannot_drop_its_control_image_keeps_cfg():
    class Controlled:
        controlnet = object()
        _callback_tensor_inputs = ["latents", "prompt_embeds"]

    class Plain:
        _callback_tensor_inputs = ["latents", "prompt_embeds"]

    assert not fast.can_stop_cfg(Controlled()) and fast.can_stop_cfg(Plain())


def test_a_panel_built_with_fast_mode_on_makes_fast_pictures():
    from sdkit import widgets

    panel = widgets.Panel("shapes-v1", groups=[fast.control_group(on=True)], auto_run=False)
    settings = panel.settings()
    assert (settings.deep_cache, settings.cfg_until, settings.token_merging) == (2, 0.5, 0.5)
    assert settings.steps == 10 and settings.sampler == "dpmpp_2m"
