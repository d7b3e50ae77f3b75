from __future__ import annotations

import json

from sdkit import device
from sdkit.__main__ import main


def make_report(**changes) -> device.DeviceReport:
    base = dict(cpu="test cpu", cores=2, threads=2, ram_gib=8.0, isa=[], accelerator="none",
                accelerator_name="", torch_version="x")
    base.update(changes)
    return device.DeviceReport(**base)


def test_report_describes_this_machine():
    r = device.report()
    assert r.cores >= 1 and r.threads >= r.cores
    assert r.ram_gib > 0.5
    assert set(r.choices) == set(device.COMPONENTS)
    assert all(c.reason for c in r.choices.values())


def test_cpu_with_bf16_units_gets_bf16_everywhere_and_says_why():
    choices = device.choose(make_report(isa=["AVX512-BF16", "AVX512", "AVX2"]))
    assert choices["unet"].dtype == "bfloat16" and "AVX512-BF16" in choices["unet"].reason
    assert choices["vae"].dtype == "bfloat16" and "NaN" in choices["vae"].reason


def test_amx_is_named_as_the_reason():
    choices = device.choose(make_report(isa=["AMX-BF16", "AVX512-BF16"]))
    assert "AMX" in choices["text_encoder"].reason


def test_cpu_without_bf16_stays_fp32_and_says_why():
    choices = device.choose(make_report(isa=["AVX2"]))
    assert {c.dtype for c in choices.values()} == {"float32"}
    assert "no bf16 units" in choices["unet"].reason


def test_sdkit_dtype_overrides(monkeypatch):
    monkeypatch.setenv("SDKIT_DTYPE", "float32")
    choices = device.choose(make_report(isa=["AMX-BF16"]))
    assert choices["unet"].dtype == "float32" and "SDKIT_DTYPE" in choices["unet"].reason


def test_matmul_measurement_is_positive():
    assert device.matmul_gflops(size=128, repeats=2) > 0


def test_cli_device_json(capsys):
    assert main(["device", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["choices"]["vae"]["dtype"] in {"float32", "bfloat16", "float16"}
    assert "isa" in data


def test_bad_sdkit_dtype_is_explained(monkeypatch):
    import pytest

    from sdkit.errors import SdkitError

    monkeypatch.setenv("SDKIT_DTYPE", "fp16")
    with pytest.raises(SdkitError, match="SDKIT_DTYPE='fp16'"):
        device.choose(make_report())


def test_every_model_part_maps_to_one_component_choice():
    from sdkit.device import COMPONENTS, component_of

    assert [component_of(p) for p in ("unet", "vae", "text_encoder", "text_encoder_2")] == \
        ["unet", "vae", "text_encoder", "text_encoder"]
    assert set(map(component_of, COMPONENTS)) == set(COMPONENTS)
