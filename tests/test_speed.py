from __future__ import annotations

import json

import pytest
import torch

from sdkit import device, openvino_unet, speed
from sdkit.__main__ import main
from sdkit.optimize import memory_format, prepare


def make_report(**changes) -> device.DeviceReport:
    base = dict(cpu="test cpu", cores=2, threads=2, ram_gib=8.0, isa=["AVX512-BF16", "AVX512"], accelerator="none",
                accelerator_name="", torch_version="x")
    return device.DeviceReport(**(base | changes))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDKIT_CACHE", str(tmp_path))
    return tmp_path


def saved(report, **seconds) -> speed.Measurement:
    found = speed.Measurement(key=speed.machine_key(report), day="2026-11-27",
                              seconds={name.replace("__", " "): s for name, s in seconds.items()})
    speed.save(found)
    return found


def test_without_a_measurement_the_cpu_features_decide(cache):
    choices = device.choose(make_report())
    assert {(c.dtype, c.layout) for c in choices.values()} == {("bfloat16", "channels_last")}
    assert "not measured yet" in str(make_report(choices=choices))


def test_a_clearly_faster_candidate_replaces_the_guess_and_says_so(cache):
    report = make_report()
    saved(report, bfloat16__channels_last=1.0, bfloat16__contiguous=0.8, float32__channels_last=2.0,
          float32__contiguous=2.1)
    choices = device.choose(report)
    unet = choices["unet"]
    assert (unet.dtype, unet.layout) == ("bfloat16", "contiguous")
    assert "measured here on 2026-11-27" in unet.reason and "contiguous instead" in unet.reason
    assert memory_format(part="unet", choice=unet) == torch.contiguous_format
    conv = prepare(torch.nn.Conv2d(4, 4, 3), part="unet", choice=unet)
    assert conv.weight.dtype == torch.bfloat16 and conv.weight.is_contiguous()
    assert choices["vae"].layout == "channels_last"  # the timed call was the UNet's: the VAE keeps the guess


def test_a_candidate_within_the_margin_keeps_the_guess(cache):
    report = make_report()
    saved(report, bfloat16__channels_last=1.0, bfloat16__contiguous=0.95, float32__channels_last=2.0,
          float32__contiguous=2.1)
    unet = device.choose(report)["unet"]
    assert (unet.dtype, unet.layout) == ("bfloat16", "channels_last") and "keeps that" in unet.reason
    assert memory_format(part="unet", choice=unet) == torch.channels_last


def test_measured_fp32_beats_emulated_bf16_only_when_clearly_faster(cache):
    report = make_report()
    saved(report, bfloat16__channels_last=1.0, bfloat16__contiguous=1.1, float32__channels_last=0.5,
          float32__contiguous=0.6)
    vae = device.choose(report)["vae"]
    assert (vae.dtype, vae.layout) == ("float32", "channels_last")
    assert vae.reason.startswith("the CPU's features suggest bfloat16")


KEY = speed.machine_key(make_report())


@pytest.mark.parametrize("text", ["not json", json.dumps({"key": KEY}), json.dumps([1, 2]),
                                  json.dumps({"key": KEY, "day": "d", "seconds": {"bfloat16 contiguous": -1}}),
                                  json.dumps({"key": KEY, "day": "d", "seconds": [1, 2]}),
                                  json.dumps({"key": KEY, "day": "d", "seconds": {"float16 tiled": 0.1}})])
def test_an_unreadable_file_is_ignored(cache, text):
    (cache / "speed.json").write_text(text)
    assert speed.load(make_report()) is None
    assert device.choose(make_report())["unet"].layout == "channels_last"


def test_another_machines_measurement_is_ignored(cache):
    saved(make_report(cpu="another cpu"), bfloat16__channels_last=1.0, float32__contiguous=0.1)
    assert speed.load(make_report()) is None
    assert device.choose(make_report())["unet"].dtype == "bfloat16"


def test_sdkit_dtype_still_wins(cache, monkeypatch):
    report = make_report()
    saved(report, bfloat16__channels_last=1.0, float32__channels_last=0.2)
    monkeypatch.setenv("SDKIT_DTYPE", "bfloat16")
    assert device.choose(report)["unet"].dtype == "bfloat16"


def test_measure_times_every_candidate_and_saves(cache, monkeypatch):
    monkeypatch.setattr(speed, "LATENT", 8)  # the real size takes seconds; the code path is the same
    report = make_report()
    found = speed.measure(report, rounds=1, progress=False)
    assert set(found.seconds) == {f"{d} {l}" for d, l in speed.candidates(report)}
    assert all(s > 0 for s in found.seconds.values())
    assert speed.load(report) == found and (cache / "speed.json").exists()
    assert not (cache / "speed.json.partial").exists()


def test_fp32_only_cpus_time_only_fp32(monkeypatch):
    assert speed.candidates(make_report(isa=["AVX2"])) == [("float32", "channels_last"), ("float32", "contiguous"),
                                                          ("float32", "openvino")]
    monkeypatch.setattr(openvino_unet, "installed", lambda: False)  # OpenVINO is timed only where it is installed
    assert speed.candidates(make_report(isa=["AVX2"])) == [("float32", "channels_last"), ("float32", "contiguous")]


def test_openvino_measured_faster_runs_the_unet_and_says_why(cache):
    report = make_report()
    saved(report, bfloat16__channels_last=1.0, bfloat16__contiguous=1.0, bfloat16__openvino=0.5,
          float32__channels_last=2.0, float32__contiguous=2.0, float32__openvino=1.5)
    choices = device.choose(report)
    unet = choices["unet"]
    assert (unet.dtype, unet.backend, unet.layout) == ("bfloat16", "openvino", "channels_last")
    assert "bf16 OpenVINO 0.50 s" in unet.reason and "so bf16 OpenVINO instead" in unet.reason
    assert {choices[part].backend for part in ("text_encoder", "vae")} == {"pytorch"}  # it timed the UNet only
    report.choices = choices
    assert "unet         cpu bfloat16 in OpenVINO" in str(report)


def test_a_forced_dtype_still_gets_its_measured_way(cache, monkeypatch):
    report = make_report()
    saved(report, bfloat16__channels_last=0.5, float32__channels_last=2.0, float32__contiguous=2.0,
          float32__openvino=1.0)
    monkeypatch.setenv("SDKIT_DTYPE", "float32")
    unet = device.choose(report)["unet"]
    assert (unet.dtype, unet.backend) == ("float32", "openvino")
    assert "set by SDKIT_DTYPE" in unet.reason and "bf16" not in unet.reason  # only fp32's candidates compared


def test_the_precision_and_layout_come_from_pytorchs_times_openvino_only_replaces_the_way(cache, monkeypatch):
    report = make_report()
    saved(report, bfloat16__channels_last=1.0, bfloat16__contiguous=0.8, bfloat16__openvino=0.5,
          float32__channels_last=2.0, float32__contiguous=2.0, float32__openvino=0.3)
    unet = device.choose(report)["unet"]
    # fp32 OpenVINO was fastest, but the text encoder and VAE (and PyTorch's fallbacks) run faster in bf16
    assert (unet.dtype, unet.layout, unet.backend) == ("bfloat16", "contiguous", "openvino")
    monkeypatch.setenv("SDKIT_BACKEND", "pytorch")
    unet = device.choose(report)["unet"]
    assert (unet.dtype, unet.layout, unet.backend) == ("bfloat16", "contiguous", "pytorch")


def test_openvino_within_the_margin_keeps_pytorch(cache):
    report = make_report()
    saved(report, bfloat16__channels_last=1.0, bfloat16__contiguous=1.1, bfloat16__openvino=0.95)
    assert device.choose(report)["unet"].backend == "pytorch"


def test_cli_measures_then_reports(cache, monkeypatch, capsys):
    monkeypatch.setattr(speed, "LATENT", 8)
    try:
        assert main(["device", "--measure", "--json"]) == 0
    finally:
        device.report.cache_clear()  # later tests see the session's own (empty) cache again
    data = json.loads(capsys.readouterr().out)
    assert "measured here" in data["choices"]["unet"]["reason"]
    assert data["choices"]["unet"]["layout"] in speed.LAYOUTS


def test_measure_missing_measures_again_when_a_candidate_was_not_timed(cache, monkeypatch):
    report = make_report()
    monkeypatch.setattr(openvino_unet, "installed", lambda: False)
    saved(report, **{f"{d}__{w}": 1.0 for d, w in speed.candidates(report)})
    assert speed.complete(report)
    monkeypatch.setattr(openvino_unet, "installed", lambda: True)  # OpenVINO installed since: one more candidate
    assert speed.load(report) is not None and not speed.complete(report)


def test_cli_on_a_gpu_machine_says_why_it_does_not_measure(cache, monkeypatch, capsys):
    monkeypatch.setattr(device, "report", lambda: make_report(accelerator="cuda", accelerator_name="a GPU"))
    assert main(["device", "--measure", "missing"]) == 0
    out = capsys.readouterr()
    assert "Not measured: sdkit runs on the cuda GPU" in out.err and "a GPU" in out.out
    assert not (cache / "speed.json").exists()
