"""The panel, driven as a learner would (without a browser): controls, runs, cancel, errors, gallery, groups."""

from __future__ import annotations

import dataclasses
import html

import numpy as np
import pytest
import torch

from sdkit import checkpoints, widgets
from sdkit.compare import CompareGroup
from sdkit.generate import GenerationSettings, generate
from sdkit.metadata import read_parameters

FAST = GenerationSettings(prompt="a red circle on a white background", seed=3, steps=4, width=64, height=64)


@pytest.fixture(scope="module")
def shapes():
    return checkpoints.load("shapes-v1")


@pytest.fixture
def panel(shapes, tmp_path):
    p = widgets.Panel(shapes, settings=FAST, out_dir=tmp_path / "outputs", auto_run=False)
    yield p
    p.cancel()
    p.wait(10)


def test_every_control_is_a_settings_field():
    names = {f.name for f in dataclasses.fields(GenerationSettings)}
    assert set(widgets.CONTROLS) <= names
    groups = {"strength", "init_image", "hires_scale", "hires_steps", "hires_upscaler",
              "controlnets", "deep_cache", "cfg_until", "token_merging"}  # lessons' groups (hires, ControlNet, fast mode), not the core
    assert set(widgets.CONTROLS) == names - {"batch_size", "extra"} - groups


def test_show_then_settings_round_trips(panel):
    wanted = FAST.replace(prompt="a blue square", negative_prompt="black", seed=77, steps=9, cfg=4.5,
                          sampler="dpmpp_2m", scheduler="karras", clip_skip=2, width=96, height=48, model="shapes-v1")
    panel.show(wanted)
    assert panel.settings() == wanted
    assert panel.controls["sampler"].label == "DPM++ 2M"


def test_family_sets_ranges_and_auto_run(shapes, tiny_files, tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for path in tiny_files.values():
        (folder / path.name).symlink_to(path)
    monkeypatch.setenv("SDKIT_MODELS", str(tmp_path))
    on_shapes = widgets.Panel(shapes)
    assert on_shapes.auto_run.value and on_shapes.controls["width"].max == 128
    assert on_shapes.controls["width"].value == 64
    sd1 = widgets.Panel(tiny_files["sd1"].name)
    assert not sd1.auto_run.value, "real-size families must not re-render on every slider move"
    assert (sd1.controls["width"].min, sd1.controls["width"].max, sd1.controls["width"].value) == (256, 1024, 512)
    xl = widgets.Panel(tiny_files["sdxl"].name)
    assert xl.controls["width"].value == 1024 and xl.controls["width"].max == 2048


def test_model_dropdown_lists_sdkit_models_root(tmp_path, tiny_files, monkeypatch):
    comfy = tmp_path / "ComfyUI" / "models" / "checkpoints" / "sd15"
    comfy.mkdir(parents=True)
    (comfy / "mine.safetensors").write_bytes(tiny_files["sd1"].read_bytes())
    monkeypatch.setenv("SDKIT_MODELS", str(tmp_path / "ComfyUI"))
    options = widgets.Panel("shapes-v1").controls["model"].options
    assert "sd15/mine.safetensors" in options and "shapes-v1.safetensors" in options


def test_generate_fills_gallery_progress_and_image(panel, shapes):
    panel.generate(wait=True)
    assert "Done (run 1)" in panel.status.value, panel.status.value
    assert panel.progress.value == panel.progress.max == 4 and panel.progress.bar_style == "success"
    assert len(panel.gallery) == 1 and bytes(panel.image.value).startswith(b"\x89PNG")
    shot = panel.gallery[0]
    expected = generate(shapes, FAST.replace(model="shapes-v1"), progress=False)[0]
    assert np.array_equal(np.asarray(shot.image), np.asarray(expected))
    assert "Steps: 4" in shot.parameters and "Seed: 3" in shot.parameters
    assert panel.gallery_box.children[0] is shot.thumbnail


def test_random_seed_is_shown(panel):
    panel.controls["seed"].value = -1
    panel.generate(wait=True)
    used = panel.gallery[0].settings.seed
    assert used != -1 and str(used) in panel.seed_used.value


def test_dice_sets_a_new_seed(panel):
    before = panel.controls["seed"].value
    panel.dice.click()
    panel.dice.click()
    assert panel.controls["seed"].value != before


def test_cancel_stops_within_one_step_and_pipeline_stays_usable(panel, shapes):
    panel.show(FAST.replace(steps=50))
    asked_at = []

    def cancel_at_five(change):
        if change["new"] == 5 and not asked_at:
            asked_at.append(change["new"])
            panel.cancel()

    panel.progress.observe(cancel_at_five, names="value")
    panel.generate(wait=True)
    panel.progress.unobserve(cancel_at_five, names="value")
    assert "Cancelled after step 5 of 50" in panel.status.value
    assert panel.progress.value <= asked_at[0] + 1
    assert panel.gallery == [] and not panel.generate_button.disabled
    panel.show(FAST)
    panel.generate(wait=True)
    clean = widgets.Panel(shapes, settings=FAST, auto_run=False)
    clean.generate(wait=True)
    assert np.array_equal(np.asarray(panel.gallery[0].image), np.asarray(clean.gallery[0].image))


def test_auto_run_makes_one_run_per_burst(panel):
    panel.auto_run.value = True
    for cfg in (2.0, 3.0, 4.0, 5.0, 6.0):
        panel.controls["cfg"].value = cfg
    panel.controls["seed"].value = 8
    assert panel.wait(30)
    assert len(panel.gallery) == 1
    assert panel.gallery[0].settings.cfg == 6.0 and panel.gallery[0].settings.seed == 8


def test_newest_request_wins(panel):
    panel.show(FAST.replace(steps=50))
    panel.generate()
    panel.show(FAST.replace(seed=11))
    panel.generate(wait=True)
    assert [shot.settings.seed for shot in panel.gallery] == [11]


def test_status_numbers_runs_so_identical_runs_read_apart(panel):
    panel.generate(wait=True)
    first = panel.status.value
    panel.generate(wait=True)
    assert "Done (run 1)" in first and "Done (run 2)" in panel.status.value, (first, panel.status.value)


def test_bad_settings_show_one_line_and_panel_keeps_working(panel):
    panel.controls["width"].value = 36
    panel.generate(wait=True)
    assert "width=36 is not usable" in panel.status.value and "Fix:" in panel.status.value
    assert "Traceback" not in panel.status.value and "\n" not in panel.status.value
    panel.controls["width"].value = 64
    panel.generate(wait=True)
    assert "Done" in panel.status.value and len(panel.gallery) == 1


def test_nan_from_vae_is_one_line(tiny_files, tmp_path):
    pipe = checkpoints.load(tiny_files["sd1"])
    p = widgets.Panel(pipe, settings=FAST.replace(steps=2), auto_run=False)
    bias = pipe.vae.decoder.conv_out.bias
    kept = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.fill_(float("nan"))
        p.generate(wait=True)
        assert "NaN" in p.status.value and "Fix:" in p.status.value and p.progress.bar_style == "danger"
    finally:
        with torch.no_grad():
            bias.copy_(kept)
    p.generate(wait=True)
    assert "Done" in p.status.value


def test_unexpected_error_keeps_traceback_out_of_sight(panel):
    class Broken(widgets.ControlGroup):
        widgets = []

        def prepare(self, pipe, settings):
            raise RuntimeError("boom\nsecond line")

    panel.groups.append(Broken())
    panel.generate(wait=True)
    assert "RuntimeError: boom" in panel.status.value and "second line" not in panel.status.value
    assert "Traceback" in panel.last_error
    panel.groups.pop()
    panel.generate(wait=True)
    assert "Done" in panel.status.value


def test_save_writes_numbered_pngs_with_parameters(panel, tmp_path):
    panel.generate(wait=True)
    first, second = panel.save(), panel.save()
    assert first != second and first.name.startswith("00000-3") and second.name.startswith("00001-3")
    assert read_parameters(first) == panel.gallery[0].settings
    assert str(second) in panel.status.value


def test_use_these_settings_puts_them_back(panel):
    panel.generate(wait=True)
    panel.show(FAST.replace(prompt="a green star", seed=99, cfg=12.0))
    use = panel.gallery[0].thumbnail.children[2].children[0]
    use.click()
    assert panel.settings() == panel.gallery[0].settings


def test_live_preview_updates_the_image_while_denoising(panel, monkeypatch):
    monkeypatch.setattr(widgets, "PREVIEW_EVERY_S", 0.0)
    shown = []
    panel.image.observe(lambda change: shown.append(change["new"]), names="value")
    panel.show(FAST.replace(steps=6))
    panel.generate(wait=True)
    assert len(shown) == 6  # 5 previews (steps 1-5) and the finished picture
    panel.preview.value = False
    shown.clear()
    panel.controls["seed"].value = 4
    panel.generate(wait=True)
    assert len(shown) == 1


def test_a_group_adds_its_part_and_prepares_the_pipe(shapes):
    calls = []

    class Note(widgets.ControlGroup):
        title = "note"

        def __init__(self):
            import ipywidgets as w

            self.text = w.Text(value="hello")
            self.widgets = [self.text]

        def update(self, settings):
            return settings.replace(extra={"Note": self.text.value})

        def prepare(self, pipe, settings):
            calls.append((pipe, settings.extra["Note"]))

    p = widgets.Panel(shapes, settings=FAST, groups=[Note()], auto_run=False)
    p.generate(wait=True)
    assert calls == [(shapes, "hello")]
    assert "Note: hello" in p.gallery[0].parameters


def test_compare_group_makes_one_picture_per_value(shapes):
    group = CompareGroup(field="cfg", values="1, 7", on=True)
    p = widgets.Panel(shapes, settings=FAST, groups=[group], auto_run=False)
    p.generate(wait=True)
    assert [shot.settings.cfg for shot in p.gallery] == [7.0, 1.0]
    assert p.progress.value == p.progress.max == 8
    group.values.value = "a, b"
    p.generate(wait=True)
    assert "not float values for cfg" in p.status.value


def test_switching_model_loads_it_and_sets_its_family(tmp_path, monkeypatch):
    from sdkit.testing import write_tiny

    write_tiny("sd1", tmp_path / "checkpoints" / "painter.safetensors", vae_levels=4)
    monkeypatch.setenv("SDKIT_MODELS", str(tmp_path))
    p = widgets.Panel("shapes-v1", settings=FAST)
    assert p.auto_run.value and p.family == "shapes"
    p.controls["model"].value = "painter.safetensors"
    assert p.wait(60)
    assert p.family == "sd1" and not p.auto_run.value and p.controls["width"].value == 512
    assert "painter.safetensors is loaded" in p.status.value
    p.show(FAST.replace(width=256, height=256))
    p.generate(wait=True)
    assert "Done" in p.status.value and p.gallery[0].settings.model == "painter"
    p.controls["model"].value = "shapes-v1.safetensors"
    assert p.wait(60) and p.family == "shapes" and p.auto_run.value
    assert p.controls["width"].value == 64 and len(p.gallery) == 2, "auto-run draws with the new model"
    assert p.gallery[0].settings.model == "shapes-v1" and p.gallery[0].image.size == (64, 64)


def test_a_broken_model_file_is_one_line_and_another_model_still_works(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "half.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    monkeypatch.setenv("SDKIT_MODELS", str(tmp_path))
    p = widgets.Panel("half.safetensors", settings=FAST, auto_run=False)
    p.generate(wait=True)
    assert "half.safetensors" in p.status.value and "Fix:" in p.status.value and "\n" not in p.status.value
    p.controls["model"].value = "shapes-v1.safetensors"
    p.wait(60)
    p.generate(wait=True)
    assert "Done" in p.status.value


def test_group_controls_inside_boxes_trigger_auto_run(shapes):
    group = CompareGroup(field="seed", values="1, 2")
    p = widgets.Panel(shapes, settings=FAST, groups=[group], auto_run=True)
    group.on.value = True  # the checkbox sits inside an HBox
    assert p.wait(60)
    assert [shot.settings.seed for shot in p.gallery] == [2, 1]


def test_show_reproduces_settings_outside_the_usual_ranges_and_names_what_it_cannot(panel):
    panel.show(FAST.replace(steps=200, cfg=35.0))
    assert panel.controls["steps"].value == 200 and panel.controls["cfg"].value == 35.0
    panel.show(FAST.replace(sampler="dpm_fast"))
    assert "sampler 'dpm_fast' is not offered here" in html.unescape(panel.status.value)
    assert panel.controls["sampler"].value == "euler_a"


def test_a_group_bug_while_auto_running_is_one_line_and_wait_returns(shapes):
    class Buggy(widgets.ControlGroup):
        def __init__(self):
            import ipywidgets as w

            self.knob = w.IntSlider(value=1)
            self.widgets = [self.knob]

        def update(self, settings):
            if self.knob.value > 1:
                raise ValueError("knob out of order")
            return settings

    group = Buggy()
    p = widgets.Panel(shapes, settings=FAST, groups=[group], auto_run=True)
    group.knob.value = 2
    assert p.wait(30), "a failing run must leave the panel idle"
    assert "ValueError: knob out of order" in p.status.value and "Traceback" in p.last_error
    group.knob.value = 1
    assert p.wait(30) and "Done" in p.status.value


def test_wait_from_the_worker_is_refused(panel):
    seen = []

    class Waits(widgets.ControlGroup):
        widgets = []

        def prepare(self, pipe, settings):
            try:
                panel.wait(1)
            except Exception as error:  # noqa: BLE001
                seen.append(error)

    panel.groups.append(Waits())
    panel.generate(wait=True)
    assert seen and "worker thread" in str(seen[0])


def test_a_failing_preview_does_not_cost_the_picture(panel, monkeypatch):
    from sdkit import preview

    monkeypatch.setattr(widgets, "PREVIEW_EVERY_S", 0.0)
    monkeypatch.setattr(preview, "show", lambda *a, **k: 1 / 0)
    panel.generate(wait=True)
    assert "Done" in panel.status.value and len(panel.gallery) == 1
    assert "ZeroDivisionError" in panel.last_error
