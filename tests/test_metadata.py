"""Tests for sdkit.metadata: A1111 parameters text and never-overwriting PNG saves."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdkit import metadata
from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings
from sdkit.metadata import (
    A1111_SAMPLER_NAMES,
    format_parameters,
    next_image_number,
    parse_parameters,
    read_parameters,
    save_image,
    save_image_as,
)


def tiny_image(color: tuple[int, int, int] = (200, 30, 30)) -> Image.Image:
    """A small RGB image, quick to encode."""
    return Image.new("RGB", (16, 16), color)


def assert_same(parsed: GenerationSettings, expected: GenerationSettings) -> None:
    """Equal fields, and equal extra (which == ignores)."""
    assert parsed == expected
    assert parsed.extra == expected.extra


# --- format ---------------------------------------------------------------------------------------


def test_sampler_table_has_the_a1111_names():
    assert len(A1111_SAMPLER_NAMES) == 16
    assert A1111_SAMPLER_NAMES["euler_a"] == "Euler a"
    assert A1111_SAMPLER_NAMES["dpmpp_2m_sde"] == "DPM++ 2M SDE"
    assert A1111_SAMPLER_NAMES["unipc"] == "UniPC"
    assert A1111_SAMPLER_NAMES["dpm_adaptive"] == "DPM adaptive"


def test_format_full_line_exactly_as_a1111():
    settings = GenerationSettings(
        prompt="a cat", negative_prompt="blurry", seed=1234, steps=20, cfg=7, sampler="euler_a",
        scheduler="karras", width=512, height=512, clip_skip=2, model="name",
    )
    assert format_parameters(settings, model_hash="abcdef1234") == (
        "a cat\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
        "Model hash: abcdef1234, Model: name, Clip skip: 2"
    )


def test_format_omits_empty_negative_default_schedule_clip_skip_and_model():
    settings = GenerationSettings(prompt="a dog", seed=5, width=640, height=384)
    assert format_parameters(settings) == (
        "a dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 640x384"
    )


def test_format_with_only_negative_prompt_starts_with_it():
    text = format_parameters(GenerationSettings(negative_prompt="ugly"))
    assert text.startswith("Negative prompt: ugly\nSteps: 20,")


@pytest.mark.parametrize("cfg, shown", [(7, "7"), (7.0, "7"), (7.5, "7.5"), (12.25, "12.25"), (1.0, "1")])
def test_cfg_prints_like_a1111(cfg, shown):
    assert f"CFG scale: {shown}, " in format_parameters(GenerationSettings(cfg=cfg))


def test_seed_argument_overrides_settings_seed():
    text = format_parameters(GenerationSettings(seed=1), seed=99)
    assert "Seed: 99," in text and "Seed: 1," not in text


def test_karras_suffix_in_sampler_is_written_as_schedule_type():
    text = format_parameters(GenerationSettings(sampler="dpmpp_2m_karras"))
    assert "Sampler: DPM++ 2M, Schedule type: Karras, " in text


def test_extras_are_appended_and_quoted_like_a1111():
    settings = GenerationSettings(
        extra={"Denoising strength": "0.5", "Lora hashes": "name: abc123", "Note": "a, b", "Version": "v1.10.1"}
    )
    assert format_parameters(settings).endswith(
        'Size: 512x512, Denoising strength: 0.5, Lora hashes: "name: abc123", Note: "a, b", Version: v1.10.1'
    )


def test_model_hash_argument_wins_over_extra_and_sits_before_model():
    settings = GenerationSettings(model="sd15", extra={"Model hash": "old"})
    assert "Model hash: new, Model: sd15" in format_parameters(settings, model_hash="new")
    assert "Model hash: old, Model: sd15" in format_parameters(settings)


def test_extra_key_that_a1111_text_cannot_hold_is_an_error():
    with pytest.raises(SdkitError, match="can't be written"):
        format_parameters(GenerationSettings(extra={"bad:key": "x"}))


# --- round trips ----------------------------------------------------------------------------------

ROUND_TRIP = [
    GenerationSettings(prompt="a cat"),
    GenerationSettings(prompt="", negative_prompt=""),
    GenerationSettings(prompt="", negative_prompt="only negative"),
    GenerationSettings(prompt="castle, (oil painting:1.2), [dark:light:0.5]", negative_prompt="lowres, bad anatomy",
                       seed=4294967295, steps=35, cfg=6.5, sampler="dpmpp_2m", scheduler="karras",
                       width=768, height=1024, clip_skip=2, model="dreamshaper_8"),
    GenerationSettings(prompt='she said "hi", then: left', negative_prompt='"quoted", text: yes'),
    GenerationSettings(prompt="line one\nline two\n\nline four", negative_prompt="neg one\nneg two"),
    GenerationSettings(prompt="日本の猫, café ☕, emoji 🐱", negative_prompt="χαμηλή ποιότητα", model="modèle"),
    GenerationSettings(prompt="x", sampler="lcm", steps=4, cfg=1.5, seed=0, clip_skip=3),
    GenerationSettings(prompt="x", sampler="dpm_adaptive", scheduler="karras", seed=123456789012345),
    GenerationSettings(prompt="x", model="name, with comma", hires_scale=2, extra={"Lora hashes": "a: 1, b: 2",
                                                                                  "Note": 'quote " and\nnewline',
                                                                                  "Empty": ""}),
    GenerationSettings(prompt="x", hires_scale=1.5, hires_steps=10, hires_upscaler="Lanczos", strength=0.35),
]


@pytest.mark.parametrize("settings", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_format_then_parse_round_trips(settings):
    text = format_parameters(settings)
    assert_same(parse_parameters(text), settings)
    assert format_parameters(parse_parameters(text)) == text


@pytest.mark.parametrize("name, display", sorted(A1111_SAMPLER_NAMES.items()))
def test_every_sampler_display_name_parses_back(name, display):
    parsed = parse_parameters(f"p\nSteps: 20, Sampler: {display}, CFG scale: 7, Seed: 1, Size: 512x512")
    assert parsed.sampler == name
    assert parsed.scheduler == "normal"
    assert "Sampler" not in parsed.extra


# --- parsing real-world text ----------------------------------------------------------------------

A1111_NEW = (
    "masterpiece, best quality, 1girl, <lora:add_detail:0.6>\n"
    "Negative prompt: (worst quality:1.4), lowres\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3158452745, Size: 512x768, "
    "Model hash: 879db523c3, Model: dreamshaper_8, Denoising strength: 0.5, Clip skip: 2, Hires upscale: 2, "
    'Hires steps: 10, Hires upscaler: R-ESRGAN 4x+ Anime6B, Lora hashes: "add_detail: 7c6bad76eb54", '
    "Version: v1.10.1"
)

A1111_OLD = (
    "a photo of an astronaut riding a horse on mars\n"
    "Negative prompt: cartoon, drawing\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 2876123, Size: 512x512, Model hash: 6ce0161689, "
    "Model: v1-5-pruned-emaonly, Version: v1.6.0"
)


def test_parse_a1111_1_10_text_with_schedule_type_and_extras():
    parsed = parse_parameters(A1111_NEW)
    assert parsed.prompt == "masterpiece, best quality, 1girl, <lora:add_detail:0.6>"
    assert parsed.negative_prompt == "(worst quality:1.4), lowres"
    assert (parsed.steps, parsed.sampler, parsed.scheduler, parsed.cfg) == (28, "dpmpp_2m", "karras", 6.5)
    assert (parsed.seed, parsed.width, parsed.height, parsed.clip_skip) == (3158452745, 512, 768, 2)
    assert parsed.model == "dreamshaper_8"
    assert (parsed.strength, parsed.hires_scale, parsed.hires_steps) == (0.5, 2, 10)
    assert parsed.hires_upscaler == "R-ESRGAN 4x+ Anime6B"
    from sdkit.generate import hires_model_path

    parsed.check()  # a well-formed setting; the upscale model is looked up when a run needs it
    with pytest.raises(SdkitError, match="R-ESRGAN 4x\\+ Anime6B"):  # refused by name, never run as another upscaler
        hires_model_path(parsed)
    assert parsed.extra == {"Model hash": "879db523c3", "Lora hashes": "add_detail: 7c6bad76eb54", "Version": "v1.10.1"}


def test_parse_old_karras_sampler_form():
    parsed = parse_parameters(A1111_OLD)
    assert (parsed.sampler, parsed.scheduler) == ("dpmpp_2m", "karras")
    assert parsed.extra == {"Model hash": "6ce0161689", "Version": "v1.6.0"}
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in format_parameters(parsed)


def test_reformatting_keeps_every_a1111_value():
    again = parse_parameters(format_parameters(parse_parameters(A1111_NEW)))
    assert_same(again, parse_parameters(A1111_NEW))


def test_parse_multiline_prompt_and_negative_prompt():
    text = (
        "first line,\nsecond line\n\nafter a blank line\n"
        "Negative prompt: neg a,\nneg b\n"
        "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512"
    )
    parsed = parse_parameters(text)
    assert parsed.prompt == "first line,\nsecond line\n\nafter a blank line"
    assert parsed.negative_prompt == "neg a,\nneg b"
    assert parsed.sampler == "euler"


def test_parse_without_negative_prompt_or_prompt():
    parsed = parse_parameters("a tree\nSteps: 12, Sampler: Heun, CFG scale: 3, Seed: 9, Size: 256x320")
    assert (parsed.prompt, parsed.negative_prompt, parsed.steps, parsed.width, parsed.height) == (
        "a tree", "", 12, 256, 320)
    bare = parse_parameters("Steps: 12, Sampler: Heun, CFG scale: 3, Seed: 9, Size: 256x320")
    assert (bare.prompt, bare.negative_prompt, bare.steps) == ("", "", 12)


def test_parse_quoted_values_with_commas_and_escapes():
    text = ('p\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, '
            'TI hashes: "easynegative: c74b4e810b03, bad-hands-5: aa7651be154c", Hires prompt: "a \\"b\\", c\\nd"')
    parsed = parse_parameters(text)
    assert parsed.extra["TI hashes"] == "easynegative: c74b4e810b03, bad-hands-5: aa7651be154c"
    assert parsed.extra["Hires prompt"] == 'a "b", c\nd'


def test_parse_comfyui_saver_text_with_crlf_and_comfy_sampler_names():
    text = ("cyberpunk city\r\nNegative prompt: blurry\r\n"
            "Steps: 25, Sampler: dpmpp_2m_karras, CFG scale: 8.0, Seed: 18446744073709551615, Size: 1024x1024, "
            "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: ComfyUI\r\n")
    parsed = parse_parameters(text)
    assert (parsed.prompt, parsed.negative_prompt) == ("cyberpunk city", "blurry")
    assert (parsed.sampler, parsed.scheduler, parsed.cfg) == ("dpmpp_2m", "karras", 8.0)
    assert parsed.seed == 18446744073709551615
    assert parsed.extra["Version"] == "ComfyUI"
    assert parse_parameters(text.replace("dpmpp_2m_karras", "euler_ancestral")).sampler == "euler_a"


def test_unknown_sampler_keeps_a_guess_and_the_raw_name():
    parsed = parse_parameters("p\nSteps: 20, Sampler: DPM++ 2M SDE Heun Karras, CFG scale: 7, Seed: 1, Size: 512x512")
    assert (parsed.sampler, parsed.scheduler) == ("dpmpp_2m_sde_heun", "karras")
    assert parsed.extra["Sampler"] == "DPM++ 2M SDE Heun Karras"
    text = format_parameters(parsed)
    assert "Sampler: DPM++ 2M SDE Heun, Schedule type: Karras, CFG scale" in text
    assert text.count("Sampler:") == 1


@pytest.mark.parametrize("display, name", [("Exponential", "exponential"), ("SGM Uniform", "sgm_uniform"),
                                           ("Beta", "beta"), ("Karras", "karras")])
def test_schedule_types_diffusers_has_are_read_and_written_back(display, name):
    text = f"p\nSteps: 20, Sampler: DPM++ 2M SDE, Schedule type: {display}, CFG scale: 7, Seed: 1, Size: 512x512"
    parsed = parse_parameters(text)
    assert (parsed.sampler, parsed.scheduler, parsed.extra) == ("dpmpp_2m_sde", name, {})
    parsed.check()
    assert format_parameters(parsed) == text


@pytest.mark.parametrize("display", ["Polyexponential", "Align Your Steps", "KL Optimal"])
def test_schedule_types_without_an_equivalent_are_refused_by_name_not_run_as_normal(display):
    text = f"p\nSteps: 20, Sampler: Euler, Schedule type: {display}, CFG scale: 7, Seed: 1, Size: 512x512"
    parsed = parse_parameters(text)
    with pytest.raises(SdkitError, match="has no diffusers equivalent"):
        parsed.check()
    assert format_parameters(parsed) == text


def test_automatic_schedule_type_means_normal():
    parsed = parse_parameters("p\nSteps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 1, "
                              "Size: 512x512")
    assert parsed.scheduler == "normal" and parsed.extra == {}


@pytest.mark.parametrize(
    "text", ["", "just a prompt", "a cat\nNegative prompt: dog", "Sampler: Euler, Seed: 1, Size: 8x8"]
)
def test_text_without_steps_line_is_an_error_naming_what_was_expected(text):
    with pytest.raises(SdkitError, match="Steps: 20") as caught:
        parse_parameters(text)
    assert caught.value.fix


@pytest.mark.parametrize("line, field", [
    ("Steps: many, Sampler: Euler, Seed: 1", "Steps"),
    ("Steps: 20, Seed: one, Size: 512x512", "Seed"),
    ("Steps: 20, CFG scale: high, Size: 512x512", "CFG scale"),
    ("Steps: 20, Seed: 1, Size: 512 by 512", "Size"),
])
def test_bad_values_name_their_field(line, field):
    with pytest.raises(SdkitError, match=field):
        parse_parameters(f"p\n{line}")


# --- PNG files ------------------------------------------------------------------------------------


def test_save_then_read_round_trips_settings_and_pixels(tmp_path):
    settings = GenerationSettings(prompt="日本の猫, \"quoted\"\nsecond line", negative_prompt="bad: yes",
                                  seed=42, sampler="dpmpp_sde", scheduler="karras", clip_skip=2, model="m")
    path = save_image(tiny_image(), settings=settings, out_dir=tmp_path, model_hash="abc123")
    assert path == tmp_path / "00000-42.png"
    read = read_parameters(path)
    assert read == settings
    assert read.extra == {"Model hash": "abc123"}
    with Image.open(path) as image:
        assert image.getpixel((0, 0)) == (200, 30, 30)


def test_save_uses_per_image_seed_in_name_and_text(tmp_path):
    settings = GenerationSettings(seed=100)
    first = save_image(tiny_image(), settings=settings, out_dir=tmp_path, seed=100)
    second = save_image(tiny_image(), settings=settings, out_dir=tmp_path, seed=101)
    assert [first.name, second.name] == ["00000-100.png", "00001-101.png"]
    assert read_parameters(second).seed == 101


def test_save_creates_missing_out_dir(tmp_path):
    out_dir = tmp_path / "outputs" / "txt2img"
    path = save_image(tiny_image(), settings=GenerationSettings(seed=3), out_dir=out_dir)
    assert path == out_dir / "00000-3.png" and path.is_file()


def test_numbering_continues_after_highest_prefix_across_gaps(tmp_path):
    for name in ("00003-1.png", "00010-2.png", "00004-9.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert next_image_number(tmp_path) == 11
    path = save_image(tiny_image(), settings=GenerationSettings(seed=7), out_dir=tmp_path)
    assert path.name == "00011-7.png"


def test_numbering_ignores_files_not_named_like_a1111(tmp_path):
    for name in ("notes.txt", "grid-0005.png", "1234-5.png", "cat.png", "00x12-3.png"):
        (tmp_path / name).write_bytes(b"x")
    assert next_image_number(tmp_path) == 0
    assert next_image_number(tmp_path / "missing") == 0
    assert save_image(tiny_image(), settings=GenerationSettings(seed=1), out_dir=tmp_path).name == "00000-1.png"


def test_existing_files_are_never_overwritten(tmp_path):
    existing = tmp_path / "00000-5.png"
    existing.write_bytes(b"precious")
    path = save_image(tiny_image(), settings=GenerationSettings(seed=5), out_dir=tmp_path)
    assert path.name == "00001-5.png"
    assert existing.read_bytes() == b"precious"


def test_name_taken_by_a_race_goes_to_the_next_number(tmp_path, monkeypatch):
    taken = tmp_path / "00000-7.png"
    taken.write_bytes(b"another process wrote this")
    calls = []
    real = metadata.next_image_number

    def stale_first(folder):
        calls.append(folder)
        return 0 if len(calls) == 1 else real(folder)  # as if 00000-7.png appeared after the scan

    monkeypatch.setattr(metadata, "next_image_number", stale_first)
    path = save_image(tiny_image(), settings=GenerationSettings(seed=7), out_dir=tmp_path)
    assert path.name == "00001-7.png"
    assert taken.read_bytes() == b"another process wrote this"
    assert len(calls) == 2


def test_concurrent_saves_all_get_their_own_file(tmp_path):
    paths, errors = [], []

    def save(index):
        try:
            paths.append(save_image(tiny_image((index, 0, 0)), settings=GenerationSettings(seed=1), out_dir=tmp_path))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=save, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(path.name for path in paths) == [f"{n:05}-1.png" for n in range(8)]
    reds = set()
    for path in paths:
        with Image.open(path) as image:
            reds.add(image.getpixel((0, 0))[0])
    assert reds == set(range(8))
    assert sorted(os.listdir(tmp_path)) == sorted(path.name for path in paths)


def test_atomic_save_leaves_no_temp_files(tmp_path):
    for seed in range(3):
        save_image(tiny_image(), settings=GenerationSettings(seed=seed), out_dir=tmp_path)
    save_image_as(tiny_image(), path=tmp_path / "named.png", settings=GenerationSettings())
    assert sorted(os.listdir(tmp_path)) == ["00000-0.png", "00001-1.png", "00002-2.png", "named.png"]


def test_failed_save_leaves_no_temp_file(tmp_path, monkeypatch):
    def broken(temp, target, data):
        raise OSError("disk full")

    monkeypatch.setattr(metadata, "_claim", broken)
    with pytest.raises(OSError, match="disk full"):
        save_image(tiny_image(), settings=GenerationSettings(), out_dir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_without_hard_links_falls_back_to_exclusive_create(tmp_path, monkeypatch):
    (tmp_path / "00000-2.png").write_bytes(b"keep")

    def no_links(src, dst):
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(metadata.os, "link", no_links)
    path = save_image(tiny_image(), settings=GenerationSettings(seed=2, prompt="fallback"), out_dir=tmp_path)
    assert path.name == "00001-2.png"
    assert read_parameters(path).prompt == "fallback"
    assert (tmp_path / "00000-2.png").read_bytes() == b"keep"
    assert sorted(os.listdir(tmp_path)) == ["00000-2.png", "00001-2.png"]


def test_saved_file_is_not_private_to_the_temp_file_mode(tmp_path):
    path = save_image(tiny_image(), settings=GenerationSettings(), out_dir=tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_image_as_writes_exactly_that_path(tmp_path):
    target = tmp_path / "sub" / "my cat.png"
    path = save_image_as(tiny_image(), path=target, settings=GenerationSettings(prompt="mine", seed=8), seed=9)
    assert path == target
    read = read_parameters(target)
    assert (read.prompt, read.seed) == ("mine", 9)


def test_save_image_as_refuses_existing_file_and_leaves_it_byte_identical(tmp_path):
    target = tmp_path / "keep.png"
    save_image_as(tiny_image((1, 2, 3)), path=target, settings=GenerationSettings(prompt="original"))
    before = target.read_bytes()
    with pytest.raises(SdkitError, match="already exists; sdkit never overwrites an image") as caught:
        save_image_as(tiny_image(), path=target, settings=GenerationSettings(prompt="new"))
    assert "keep.png" in str(caught.value)
    assert caught.value.fix == "choose another name or delete it yourself"
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.png"]


def test_save_image_as_refuses_a_file_that_appears_after_the_check(tmp_path, monkeypatch):
    target = tmp_path / "raced.png"
    target.write_bytes(b"winner")
    monkeypatch.setattr(metadata.os.path, "lexists", lambda path: False)  # the check saw nothing
    with pytest.raises(SdkitError, match="already exists"):
        save_image_as(tiny_image(), path=target, settings=GenerationSettings())
    assert target.read_bytes() == b"winner"
    assert os.listdir(tmp_path) == ["raced.png"]


def test_save_image_as_wants_png_and_a_pil_image(tmp_path):
    with pytest.raises(SdkitError, match="PNG") as caught:
        save_image_as(tiny_image(), path=tmp_path / "cat.jpg", settings=GenerationSettings())
    assert "cat.png" in caught.value.fix
    with pytest.raises(SdkitError, match="PIL image"):
        save_image(object(), settings=GenerationSettings(), out_dir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_read_parameters_from_itxt_chunk(tmp_path):
    info = PngInfo()
    info.add_itxt("parameters", "ü\nSteps: 5, Sampler: DDIM, CFG scale: 4, Seed: 2, Size: 64x64")
    path = tmp_path / "itxt.png"
    tiny_image().save(path, pnginfo=info)
    read = read_parameters(path)
    assert (read.prompt, read.sampler, read.steps) == ("ü", "ddim", 5)


def test_missing_parameters_chunk_is_a_clear_error(tmp_path):
    path = tmp_path / "plain.png"
    tiny_image().save(path)
    with pytest.raises(SdkitError, match="no 'parameters' text chunk") as caught:
        read_parameters(path)
    assert str(path) in caught.value.message
    assert caught.value.fix


def test_comfyui_graph_only_file_says_so(tmp_path):
    info = PngInfo()
    info.add_text("prompt", '{"3": {"class_type": "KSampler"}}')
    info.add_text("workflow", '{"nodes": []}')
    path = tmp_path / "ComfyUI_00001_.png"
    tiny_image().save(path, pnginfo=info)
    with pytest.raises(SdkitError, match="ComfyUI") as caught:
        read_parameters(path)
    assert "prompt, workflow" in caught.value.message


def test_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(SdkitError, match="does not exist"):
        read_parameters(tmp_path / "nope.png")
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(SdkitError, match="not an image"):
        read_parameters(fake)


def test_bad_parameters_text_in_a_file_names_the_file(tmp_path):
    info = PngInfo()
    info.add_text("parameters", "just a prompt, no settings")
    path = tmp_path / "odd.png"
    tiny_image().save(path, pnginfo=info)
    with pytest.raises(SdkitError, match="Steps") as caught:
        read_parameters(path)
    assert caught.value.message.startswith(str(path))


def test_importing_metadata_loads_no_torch_or_diffusers():
    code = "import sys, sdkit.metadata; print(sorted({'torch', 'diffusers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], check=True)
    assert result.stdout.strip() == "[]"
