from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdkit import checkpoints, controlnet, convert, device
from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings, generate
from sdkit.metadata import format_parameters, parse_parameters
from sdkit.optimize import prepare
from sdkit.testing import write_controlnet, write_lora

RUN = GenerationSettings(prompt="a red circle on a white background", seed=3, steps=6, width=64, height=64)


@pytest.fixture(scope="module")
def shapes():
    return checkpoints.load("shapes-v1")


@pytest.fixture(scope="module")
def files(shapes, tmp_path_factory):
    """One random shapes-world ControlNet written in each of the three layouts, plus a control image."""
    folder = tmp_path_factory.mktemp("controlnet")
    said = {"modelspec.architecture": "sdkit-shapes-v1/controlnet"}  # as the bundled one says what it is for
    reference = {layout: write_controlnet(shapes, folder / f"cn-{layout}.safetensors", layout=layout, metadata=said)
                 for layout in ("original", "diffusers", "difference")}
    control = Image.new("RGB", (64, 64))
    control.paste((255, 255, 255), (10, 30, 40, 60))
    control.save(folder / "control.png")
    return {"folder": folder, "reference": reference["original"], "control": folder / "control.png"}


def unit(files, layout="original", **changes) -> controlnet.Unit:
    return controlnet.Unit(model=str(files["folder"] / f"cn-{layout}.safetensors"), image=str(files["control"]),
                           **changes)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_original_layout_gives_the_same_image_as_diffusers_controlnetmodel(shapes, files):
    settings = RUN.replace(controlnets=(unit(files),))
    ours = generate(shapes, settings, progress=False)[0]
    loaded = controlnet.load(settings.controlnets[0].model, pipe=shapes)
    assert loaded.layout == "original" and loaded.family == "shapes"
    # the same run with diffusers' own model of the same weights, prepared as sdkit prepares its own (packed, fused)
    reference = prepare(files["reference"], part="unet", choice=device.choose(device.report())["unet"])
    loaded.model, kept = reference.to(dtype=shapes.unet.dtype), loaded.model
    try:
        theirs = generate(shapes, settings, progress=False)[0]
    finally:
        loaded.model = kept
    plain = generate(shapes, RUN, progress=False)[0]
    assert np.array_equal(pixels(ours), pixels(theirs))
    assert np.abs(pixels(ours) - pixels(plain)).mean() > 5  # and the ControlNet did change the picture


def test_original_layout_names_match_diffusers_own_converter(tiny_files):
    """sdkit's key mapping against diffusers' convert_controlnet_checkpoint, on SD1's real hint encoder."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    pipe = checkpoints.load(tiny_files["sd1"])
    model = ControlNetModel.from_unet(pipe.unet)  # (16, 32, 96, 256): input_hint_block.0 .. .14 as in the real files
    state = model.state_dict()
    original = convert.controlnet_to_ldm(state, layers_per_block=model.config.layers_per_block)
    assert "control_model.input_hint_block.14.weight" in original and "control_model.middle_block_out.0.bias" in original
    back = convert_controlnet_checkpoint(original, dict(model.config))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("layout", ["diffusers", "difference"])
def test_other_layouts_load_the_same_weights(shapes, files, layout):
    ours = controlnet.load(files["folder"] / f"cn-{layout}.safetensors", pipe=shapes)
    assert ours.layout == layout
    expected = files["reference"].state_dict()
    for key, value in ours.model.state_dict().items():
        torch.testing.assert_close(value.float(), expected[key].to(value.dtype).float(), atol=2e-2, rtol=2e-2)


def test_weight_zero_is_no_controlnet_and_start_end_matter(shapes, files):
    plain = pixels(generate(shapes, RUN, progress=False)[0])
    off = generate(shapes, RUN.replace(controlnets=(unit(files, weight=0.0),)), progress=False)[0]
    assert np.array_equal(pixels(off), plain)
    full = pixels(generate(shapes, RUN.replace(controlnets=(unit(files),)), progress=False)[0])
    early = pixels(generate(shapes, RUN.replace(controlnets=(unit(files, end=0.5),)), progress=False)[0])
    assert not np.array_equal(early, full) and not np.array_equal(early, plain)


def test_several_controlnets_at_once_each_count(shapes, files):
    one = pixels(generate(shapes, RUN.replace(controlnets=(unit(files),)), progress=False)[0])
    two = generate(shapes, RUN.replace(controlnets=(unit(files), unit(files, "diffusers", weight=0.5))),
                   progress=False)[0]
    assert not np.array_equal(pixels(two), one)
    assert [u.weight for u in two.sdkit_settings.controlnets] == [1.0, 0.5]


def test_units_are_written_as_a1111s_controlnet_extension_and_read_back(shapes, files):
    image = generate(shapes, RUN.replace(controlnets=(unit(files, weight=0.8, start=0.1, end=0.9),)),
                     progress=False)[0]
    text = format_parameters(image.sdkit_settings)
    line = text.splitlines()[-1]
    digest = controlnet.load(files["folder"] / "cn-original.safetensors", pipe=shapes).model_hash
    assert (f'ControlNet 0: "Module: none, Model: cn-original [{digest}], Weight: 0.8, Resize Mode: Crop and Resize, '
            f'Processor Res: 64, Guidance Start: 0.1, Guidance End: 0.9, Pixel Perfect: False, Control Mode: Balanced"'
            ) in line
    back = parse_parameters(text).controlnets[0]
    assert (back.model, back.weight, back.start, back.end, back.preprocess, back.resize_mode, back.model_hash) == (
        "cn-original", 0.8, 0.1, 0.9, "none", "crop_and_resize", digest)
    assert back.image == ""  # A1111's text does not carry the control image


def test_canny_unit_records_its_module_and_thresholds():
    text = controlnet.Unit(model="m", image="x.png", preprocess="canny").describe(width=512, height=768)
    assert text.startswith("Module: canny, Model: m, Weight: 1, Resize Mode: Crop and Resize, Processor Res: 512, "
                           "Threshold A: 100, Threshold B: 200")
    assert controlnet.parse_unit(text).preprocess == "canny"


def test_a_controlnet_of_another_family_is_refused_naming_both(tiny_files, files, shapes):
    sd1 = checkpoints.load(tiny_files["sd1"])
    with pytest.raises(SdkitError, match=r"cn-original.safetensors is made for shapes models, but checkpoint "
                                         r"tiny-sd1.safetensors is sd1"):
        generate(sd1, RUN.replace(width=32, height=32, controlnets=(unit(files),)), progress=False)
    write_controlnet(sd1, files["folder"] / "sd1-net.safetensors")
    with pytest.raises(SdkitError, match=r"sd1-net.safetensors is made for a UNet with blocks \[32, 64\] and "
                                         r"cross-attention 32, but checkpoint shapes-v1.safetensors \(shapes\) has "
                                         r"blocks \[32, 64, 64\]"):
        controlnet.load(files["folder"] / "sd1-net.safetensors", pipe=shapes)


def test_a_file_that_is_not_a_controlnet_is_refused_saying_what_it_looks_like(shapes, tmp_path):
    write_lora(shapes, tmp_path / "style.safetensors")
    with pytest.raises(SdkitError, match=r"style.safetensors is not a ControlNet.*looks like a LoRA"):
        controlnet.load(tmp_path / "style.safetensors", pipe=shapes)


@pytest.mark.parametrize("changes, message", [
    ({"weight": 2.5}, r"weight 2.5 is outside 0..2"),
    ({"start": 0.6, "end": 0.4}, r"start 0.6 and end 0.4"),
    ({"preprocess": "hed"}, r"no preprocessor 'hed'"),
    ({"resize_mode": "stretch"}, r"no resize mode 'stretch'"),
    ({"image": ""}, r"has no control image"),
])
def test_bad_units_are_refused_before_any_work(changes, message):
    bad = controlnet.Unit(model="shapes-v1-layout", **{"image": "x.png", **changes})
    with pytest.raises(SdkitError, match=message):
        RUN.replace(controlnets=(bad,)).check()


@pytest.mark.parametrize("spec, expected", [
    ("net", (1.0, 0.0, 1.0)), ("net:0.5", (0.5, 0.0, 1.0)), ("net:1.2:0.1:0.6", (1.2, 0.1, 0.6)),
])
def test_command_line_spec(spec, expected):
    parsed = controlnet.parse_spec(spec, image="a.png")
    assert (parsed.model, parsed.weight, parsed.start, parsed.end) == ("net", *expected)


def test_command_line_spec_with_words_is_refused():
    with pytest.raises(SdkitError, match="should be numbers"):
        controlnet.parse_spec("net:strong")


def test_panel_group_makes_one_unit_from_its_source_and_shows_an_old_one():
    from sdkit.shapes.controls import LayoutEditor

    editor = LayoutEditor(cx=0.3)
    group = controlnet.control_group(source=editor, model="shapes-v1-layout", weight=0.8, start=0.0, end=0.6)
    unit = group.update(RUN).controlnets[0]
    assert (unit.model, unit.weight, unit.start, unit.end) == ("shapes-v1-layout", 0.8, 0.0, 0.6)
    assert np.array_equal(np.asarray(unit.picture), np.asarray(editor.picture()))
    editor.x.value = 0.7
    assert not np.array_equal(np.asarray(group.update(RUN).controlnets[0].picture), np.asarray(unit.picture))
    group.show(RUN.replace(controlnets=(controlnet.Unit(model="shapes-v1-layout", weight=1.5, start=0.2, end=0.9),)))
    assert (group.weight.value, group.steps.value) == (1.5, (0.2, 0.9))
    group.show(RUN)
    assert group.update(RUN).controlnets == ()


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_sdxl_controlnets_load_and_run(tiny_files, tmp_path, layout):
    sdxl = checkpoints.load(tiny_files["sdxl"])
    reference = write_controlnet(sdxl, tmp_path / "xl.safetensors", layout=layout)
    loaded = controlnet.load(tmp_path / "xl.safetensors", pipe=sdxl)
    assert loaded.layout == layout and loaded.model.config.addition_embed_type == "text_time"
    expected = reference.state_dict()
    assert all(torch.equal(v.float(), expected[k].to(v.dtype).float()) for k, v in loaded.model.state_dict().items())
    Image.new("RGB", (32, 32), "white").save(tmp_path / "c.png")
    settings = RUN.replace(width=32, height=32, steps=3)
    unit_ = controlnet.Unit(model=str(tmp_path / "xl.safetensors"), image=str(tmp_path / "c.png"))
    with_net = generate(sdxl, settings.replace(controlnets=(unit_,)), progress=False)[0]
    assert not np.array_equal(pixels(with_net), pixels(generate(sdxl, settings, progress=False)[0]))


def test_two_panel_groups_make_two_units():
    first = controlnet.control_group(source=Image.new("RGB", (64, 64)), weight=0.5)
    second = controlnet.control_group(source=Image.new("RGB", (64, 64), "white"), weight=1.5, unit=1)
    settings = second.update(first.update(RUN))
    assert [u.weight for u in settings.controlnets] == [0.5, 1.5]
    assert second.title == "ControlNet 1"
    first.on.value = False
    second.show(settings)
    assert second.on.value and second.weight.value == 1.5
    assert [u.weight for u in second.update(first.update(RUN)).controlnets] == [1.5]
