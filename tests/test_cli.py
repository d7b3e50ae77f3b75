from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdkit.__main__ import main
from sdkit.generate import GenerationSettings
from sdkit.metadata import read_parameters


@pytest.fixture
def root(tiny_files, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(tiny_files["sd1"], tmp_path / "checkpoints" / "tiny.safetensors")
    return tmp_path


ARGS = ["generate", "--model", "tiny", "--prompt", "a blue square, on black", "--negative", "red", "--seed", "5",
        "--steps", "3", "--cfg", "6.5", "--sampler", "dpmpp_2m_karras", "--width", "32", "--height", "40", "--quiet"]


def test_generate_writes_png_whose_parameters_parse_back(root, capsys):
    out = root / "out"
    assert main(["--root", str(root), *ARGS, "--out", str(out)]) == 0
    first = capsys.readouterr().out.split()
    assert main(["--root", str(root), *ARGS, "--out", str(out)]) == 0
    second = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in first + second] == ["00000-5.png", "00001-5.png"]
    expected = GenerationSettings(prompt="a blue square, on black", negative_prompt="red", seed=5, steps=3, cfg=6.5,
                                  sampler="dpmpp_2m", scheduler="karras", width=32, height=40, model="tiny")
    assert read_parameters(first[0]) == expected
    a, b = (np.asarray(Image.open(p)) for p in (first[0], second[0]))
    assert a.shape == (40, 32, 3) and np.array_equal(a, b)


def test_batch_writes_one_file_per_seed(root, capsys):
    assert main(["--root", str(root), *ARGS, "--batch", "2", "--out", str(root / "b")]) == 0
    paths = capsys.readouterr().out.split()
    assert [read_parameters(p).seed for p in paths] == [5, 6]


def test_params_prints_settings(root, capsys):
    main(["--root", str(root), *ARGS, "--out", str(root / "p")])
    path = capsys.readouterr().out.split()[0]
    assert main(["params", path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sampler"] == "dpmpp_2m" and data["height"] == 40


def test_models_lists_the_root(root, capsys):
    assert main(["--root", str(root), "models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"]["checkpoints"][0] == "tiny.safetensors"


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "nope", "--prompt", "x"], "No checkpoints model named 'nope'"),
    ([*ARGS, "--seed", "99999999999999999999"], "seed=99999999999999999999 is out of range"),
    ([*ARGS, "--clip-skip", "20"], "clip_skip=20 is more than"),
    ([*ARGS, "--sampler", "lcm", "--steps", "60"], "too many for the LCM"),
    ([*ARGS[:-1], "--width", "33"], "width=33"),
    ([*ARGS, "--steps", "0"], "steps=0"),
    ([*ARGS, "--sampler", "fast"], "Unknown sampler 'fast'"),
])
def test_bad_input_is_one_clear_error(root, capsys, argv, message):
    out = root / "untouched"
    assert main(["--root", str(root), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_cli_process_has_no_traceback(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("not a model")
    result = subprocess.run([sys.executable, "-m", "sdkit", "info", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "starts with text" in result.stderr and "Traceback" not in result.stderr
    assert bad.read_text() == "not a model"


def test_hires_and_img2img_options_reach_the_png(root, capsys):
    out = root / "out"
    assert main(["--root", str(root), *ARGS, "--out", str(out), "--hires-scale", "2", "--hires-strength", "0.4",
                 "--hires-steps", "4"]) == 0
    hires = capsys.readouterr().out.split()[0]
    settings = read_parameters(hires)
    assert (settings.hires_scale, settings.strength, settings.hires_steps) == (2, 0.4, 4)
    assert Image.open(hires).size == (64, 80)
    assert main(["--root", str(root), *ARGS, "--out", str(out), "--init-image", hires, "--strength", "0.5"]) == 0
    again = capsys.readouterr().out.split()[0]
    assert read_parameters(again).strength == 0.5 and Image.open(again).size == (32, 40)


def test_upscale_writes_new_files_and_generate_can_upscale_too(root, capsys, monkeypatch):
    from sdkit.testing import write_upscaler

    monkeypatch.delenv("SDKIT_MODELS", raising=False)
    (root / "upscale_models").mkdir()
    write_upscaler("compact", root / "upscale_models" / "tiny-x4.safetensors")
    out = root / "out"
    assert main(["--root", str(root), *ARGS, "--out", str(out), "--upscaler", "tiny-x4",
                 "--hires-scale", "1.5", "--hires-upscaler", "tiny-x4", "--hires-strength", "0.4"]) == 0
    made, enlarged = capsys.readouterr().out.split()
    assert Image.open(made).size == (48, 64) and Image.open(enlarged).size == (192, 256)
    assert read_parameters(made).hires_upscaler == "tiny-x4"
    assert Image.open(enlarged).info["postprocessing"].endswith("Postprocess upscaler: tiny-x4")
    assert main(["--root", str(root), "upscale", made, "--model", "tiny-x4", "--quiet"]) == 0
    again = capsys.readouterr().out.strip()
    assert again.endswith("-tiny-x4-1.png"), "the first upscaled file is kept"


@pytest.mark.parametrize("argv, message", [
    (["upscale", "missing.png", "--model", "tiny-x4"], "missing.png does not exist"),
    (["upscale", "IMAGE", "--model", "nope"], "No upscale_models model named 'nope'"),
    (["upscale", "IMAGE", "--model", "checkpoints/tiny.safetensors"], "is not an upscale model"),
    ([*ARGS, "--upscaler", "nope"], "No upscale_models model named 'nope'"),
    ([*ARGS, "--hires-scale", "2", "--hires-upscaler", "nope"], "Hires upscaler 'nope' is neither"),
])
def test_bad_upscale_input_is_one_clear_error(root, capsys, argv, message, monkeypatch):
    from sdkit.testing import write_upscaler

    monkeypatch.chdir(root)
    (root / "upscale_models").mkdir()
    write_upscaler("compact", root / "upscale_models" / "tiny-x4.safetensors")
    Image.new("RGB", (8, 8)).save(root / "IMAGE", format="PNG")
    before = sorted(p.name for p in root.rglob("*"))
    assert main(["--root", str(root), *[a if a != "checkpoints/tiny.safetensors" else str(root / a) for a in argv]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert sorted(p.name for p in root.rglob("*")) == before


def test_pose_writes_a_skeleton_and_its_json_and_never_overwrites(tmp_path, capsys):
    out, keypoints = tmp_path / "kneel.png", tmp_path / "kneel.json"
    assert main(["pose", "--preset", "kneeling", "--out", str(out), "--json", str(keypoints)]) == 0
    assert Image.open(out).size == (512, 512) and np.asarray(Image.open(out)).max() == 255
    assert main(["pose", "--from-json", str(keypoints), "--out", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "again.png")))
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["pose", "--preset", "standing", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["pose", "--preset", "dancing", "--out", str(tmp_path / "x.png")]) == 2
    assert "no pose preset 'dancing'" in capsys.readouterr().err


def test_generate_with_a_controlnet_records_the_unit(tmp_path, capsys):
    from sdkit import checkpoints
    from sdkit.testing import write_controlnet

    write_controlnet(checkpoints.load("shapes-v1"), tmp_path / "controlnet" / "net.safetensors",
                     metadata={"modelspec.architecture": "sdkit-shapes-v1/controlnet"})
    Image.new("RGB", (64, 64), "white").save(tmp_path / "photo.png")
    args = ["--root", str(tmp_path), "generate", "--model", "shapes-v1", "--prompt", "a red circle", "--steps", "3",
            "--controlnet", "net:0.7:0:0.5", "--control-image", str(tmp_path / "photo.png"), "--preprocess", "canny",
            "--resize-mode", "just_resize", "--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 0
    png = capsys.readouterr().out.split()[0]
    unit = read_parameters(png).controlnets[0]
    assert (unit.model, unit.weight, unit.start, unit.end, unit.preprocess, unit.resize_mode) == (
        "net", 0.7, 0.0, 0.5, "canny", "just_resize")


def test_controlnet_problems_are_one_line_before_the_checkpoint_loads(root, tmp_path, capsys):
    assert main(["--root", str(root), *ARGS, "--controlnet", "net"]) == 2
    assert "--controlnet needs a --control-image" in capsys.readouterr().err
    (root / "controlnet").mkdir()
    shutil.copy(root / "checkpoints" / "tiny.safetensors", root / "controlnet" / "oops.safetensors")
    assert main(["--root", str(root), *ARGS, "--controlnet", "oops", "--control-image", "x.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: oops.safetensors is not a ControlNet") and "Traceback" not in err
