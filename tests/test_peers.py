from __future__ import annotations

import pytest

from sdkit import peers
from sdkit.errors import SdkitError

# Lines as stable-diffusion.cpp 0.4.7 logged them for one 512² image (bench --peers on an AMX Xeon).
SDCPP_LOG = """[INFO ] stable-diffusion.cpp:3168 - get_learned_condition completed, taking 0.71s
[INFO ] stable-diffusion.cpp:3432 - sampling completed, taking 139.98s
[INFO ] stable-diffusion.cpp:3212 - decode_first_stage completed, taking 51.65s
[INFO ] stable-diffusion.cpp:3591 - generate_image completed in 191.94s
"""


def test_sdcpp_times_are_read_from_its_log():
    assert peers.sdcpp_times(SDCPP_LOG) == {"sampling": 139.98, "decode": 51.65, "image": 191.94}


def test_a_changed_sdcpp_log_is_an_error_not_a_zero():
    with pytest.raises(SdkitError, match="decode"):
        peers.sdcpp_times(SDCPP_LOG.replace("decode_first_stage", "vae_decode"))


def test_without_bf16_units_bf16_is_not_forced():
    here, missing = peers.available(bf16=False)
    assert "sdkit" in here and "openvino_bf16" not in here
    assert any("openvino_bf16" in line or "openvino is not installed" in line for line in missing)


def test_a_missing_peer_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(peers, "version", lambda package: None)
    here, missing = peers.available(bf16=True)
    assert here == ["sdkit", "sdkit_fp32"]
    assert missing == [f"openvino is not installed: {peers.INSTALL}",
                       f"stable-diffusion-cpp-python is not installed: {peers.INSTALL}"]


def test_sdkit_engine_times_every_part_in_its_own_process(tiny_files):
    result = peers.run(engines=["sdkit"], checkpoint=tiny_files["sd1"], size=64, rounds=2, progress=False)
    rows = result["peers"]["sdkit"]
    assert set(rows) == set(peers.PARTS)
    for row in rows.values():
        assert row["seconds"] > 0 and len(row["runs"]) == 2 and row["peak_rss_gib"] > 0
    assert result["engines"]["sdkit"]["load_s"] >= 0
    kinds = result["breakdown"]["sdkit"]  # profiled after the timing
    assert set(kinds) == {"convolution", "matmul", "attention", "other", "between"}
    assert kinds["convolution"]["seconds"] > 0 and sum(k["share"] for k in kinds.values()) == pytest.approx(1, abs=0.01)
    assert all(k["gflops"] is None for k in kinds.values())  # FLOPs are counted only for the run's own SD1.5 file
    table = peers.format_table(result)
    assert "sdkit" in table and "UNet step, CFG" in table and "by operator kind" in table


def test_an_engine_that_fails_to_load_is_reported_not_raised(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    result = peers.run(engines=["sdkit"], checkpoint=broken, size=64, rounds=1, progress=False)
    assert "broken.safetensors" in result["engines"]["sdkit"]["error"]
    assert result["peers"] == {}
    assert "broken.safetensors" in peers.format_table(result)


def test_cfg_ratio_compares_sdkit_with_openvinos_fastest():
    result = {"peers": {"sdkit": {"unet_step_cfg": {"seconds": 3.0}},
                        "openvino": {"unet_step_cfg": {"seconds": 3.3}},
                        "openvino_bf16": {"unet_step_cfg": {"seconds": 3.6}}}}
    assert peers.cfg_ratio(result) == 1.1
    assert peers.cfg_ratio({"peers": {"sdkit": {"unet_step_cfg": {"seconds": 3.0}}}}) is None


def test_cfg_rounds_pair_each_round_with_openvinos_faster_row():
    result = {"peers": {"sdkit": {"unet_step_cfg": {"seconds": 3.0, "runs": [2.0, 3.0, 4.0]}},
                        "openvino": {"unet_step_cfg": {"seconds": 3.3, "runs": [2.2, 3.3, 3.6]}},
                        "openvino_bf16": {"unet_step_cfg": {"seconds": 3.6, "runs": [3.6, 3.6, 3.6]}}}}
    pairs = peers.cfg_rounds(result)
    assert pairs == {"against": "openvino", "ratios": [1.1, 1.1, 0.9], "median": 1.1, "sdkit_faster": 2, "rounds": 3}
    result["peers"]["openvino"]["unet_step_cfg"]["runs"] = [2.2, 3.3]  # a failed round: no pairing
    result["peers"]["openvino_bf16"]["unet_step_cfg"]["seconds"] = 9.0
    assert peers.cfg_rounds(result) is None
    assert peers.cfg_rounds({"peers": {"sdkit": {"unet_step_cfg": {"runs": [1.0]}}}}) is None


def test_fp32_engines_run_only_when_named(tiny_files):
    assert not peers.ENGINES["sdkit_fp32"].default and not peers.ENGINES["openvino_f32"].default
    result = peers.run(engines=["sdkit_fp32"], checkpoint=tiny_files["sd1"], size=64, rounds=1, progress=False)
    assert set(result["peers"]) == {"sdkit_fp32"}
    assert result["engines"]["sdkit_fp32"]["note"].startswith("float32: float32: set by SDKIT_DTYPE")


def test_sdkit_with_its_unet_in_openvino_times_every_part(tiny_files):
    assert not peers.ENGINES["sdkit_openvino"].default
    result = peers.run(engines=["sdkit_openvino"], checkpoint=tiny_files["sd1"], size=64, rounds=1, progress=False)
    assert set(result["peers"]["sdkit_openvino"]) == set(peers.PARTS)
    assert " in OpenVINO: " in result["engines"]["sdkit_openvino"]["note"]
    assert "openvino: set by SDKIT_BACKEND" in result["engines"]["sdkit_openvino"]["note"]


def test_an_unknown_engine_is_named_with_the_choices():
    with pytest.raises(SdkitError, match="sdkit_fp16: not an engine"):
        peers.run(engines=["sdkit_fp16"], progress=False)
