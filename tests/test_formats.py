from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from sdkit import formats
from sdkit.errors import SdkitError


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_info_detects_tiny_files_in_real_layout(tiny_files, family):
    info = formats.info(tiny_files[family])
    assert info["family"] == family
    assert info["format"] == "safetensors" and info["dtype"] == "float32"
    assert info["components"][:3] == ["unet", "vae", "text_encoder"]
    assert ("text_encoder_2" in info["components"]) == (family == "sdxl")
    assert info["parameters"] > 1_000_000
    assert len(info["sha256"]) == 64 and info["autov2"] == info["sha256"][:10]


def test_hash_matches_hashlib(tmp_path):
    import hashlib

    f = tmp_path / "x.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(3)}, str(f))
    assert formats.sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_header_read_without_tensor_data(tmp_path):
    f = tmp_path / "big.safetensors"
    save_file({"a": torch.zeros(1000, 1000, dtype=torch.float16)}, str(f), metadata={"k": "v"})
    specs, metadata = formats.read_safetensors_header(f)
    assert specs["a"] == formats.TensorSpec("float16", (1000, 1000)) and metadata == {"k": "v"}


def test_zero_byte_file(tmp_path):
    f = tmp_path / "empty.safetensors"
    f.touch()
    with pytest.raises(SdkitError, match="empty"):
        formats.info(f)


def test_truncated_file_says_so(tiny_files, tmp_path):
    f = tmp_path / "cut.safetensors"
    data = tiny_files["sd1"].read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(SdkitError, match="truncated") as err:
        formats.info(f)
    assert "download" in str(err.value)


@pytest.mark.parametrize("content, expected", [
    (b"hello, this is a text file and not a model at all\n", "starts with text"),
    (b"<!DOCTYPE html><html><body>Please log in</body></html>", "web page"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "Git LFS pointer"),
])
def test_text_renamed_safetensors(tmp_path, content, expected):
    f = tmp_path / "fake.safetensors"
    f.write_bytes(content)
    with pytest.raises(SdkitError, match=expected):
        formats.info(f)


def test_damaged_header(tmp_path):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(struct.pack("<Q", 10) + b"{not json}" + b"\0" * 10)
    with pytest.raises(SdkitError, match="damaged"):
        formats.info(f)


class Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_pickle_needing_code_is_refused(tmp_path):
    f = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "trainer": Evil()}, f)
    before = f.read_bytes()
    with pytest.raises(SdkitError, match="refused") as err:
        formats.info(f)
    assert "safetensors" in err.value.fix
    assert f.read_bytes() == before


def test_plain_tensor_pickle_is_read_and_unwrapped(tmp_path, tiny_files):
    from safetensors.torch import load_file

    f = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(tiny_files["sd1"]), "global_step": 5}, f)
    info = formats.info(f)
    assert info["family"] == "sd1" and info["format"] == "pickle"


def test_text_renamed_ckpt(tmp_path):
    f = tmp_path / "notes.pt"
    f.write_text("just some notes")
    with pytest.raises(SdkitError, match="not a PyTorch weight file|could not be read"):
        formats.info(f)


def test_unknown_family_lists_tensor_names(tmp_path):
    f = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2), "decoder.head.bias": torch.zeros(2)}, str(f))
    with pytest.raises(SdkitError, match="Unknown model family") as err:
        formats.info(f)
    assert "encoder.layer.0.weight" in str(err.value)


def test_bare_unet_and_flux_detection():
    spec = formats.TensorSpec("float16", (320, 1024))
    assert formats.detect_family({"input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": spec}) == "sd2"
    flux = {"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": formats.TensorSpec("bfloat16", (9216, 3072))}
    assert formats.detect_family(flux) == "flux"
    assert formats.components(list(flux)) == ["transformer"]


def test_wrong_extension(tmp_path):
    f = tmp_path / "model.zip"
    f.write_bytes(b"PK")
    with pytest.raises(SdkitError, match="not a weight-file extension"):
        formats.info(f)


def test_cli_info_json(tiny_files, capsys):
    from sdkit.__main__ import main

    assert main(["info", str(tiny_files["sdxl"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"family", "format", "dtype", "parameters", "components", "sha256", "autov2"} <= set(data)
    assert data["family"] == "sdxl"


def _rss_bytes() -> int:
    """Resident memory of this process now (Linux)."""
    import os

    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _write_unpadded(path, tensors: dict) -> None:
    """A safetensors file with an odd-length header, as writers before safetensors 0.3 made: tensors misaligned."""
    names = {torch.float16: "F16", torch.float32: "F32"}
    header, data, offset = {}, b"", 0
    for name, t in tensors.items():
        raw = t.numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    text = json.dumps(header).encode()
    text += b" " * (1 - len(text) % 2)  # odd length
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_mapped_tensors_equal_safetensors_own_reader(tiny_files):
    from safetensors.torch import load_file

    mapped, reference = formats.load_state_dict(tiny_files["sdxl"]), load_file(tiny_files["sdxl"])
    assert isinstance(mapped, formats.MappedTensors) and set(mapped) == set(reference)
    assert all(mapped[k].dtype == reference[k].dtype and torch.equal(mapped[k], reference[k]) for k in reference)


def test_misaligned_tensors_from_old_writers_are_read_in_place(tmp_path):
    from safetensors.torch import load_file

    f = tmp_path / "old.safetensors"
    tensors = {"a": torch.arange(3, dtype=torch.float16), "b": torch.arange(2**20, dtype=torch.float32) / 7}
    _write_unpadded(f, tensors)
    mapped = formats.load_state_dict(f)
    assert all(torch.equal(mapped[k], v) and torch.equal(mapped[k], load_file(f)[k]) for k, v in tensors.items())
    assert mapped["b"].data_ptr() - mapped["a"].data_ptr() == 6  # views of the map, not copies


def test_tensor_that_does_not_fit_its_bytes_is_reported(tmp_path):
    f = tmp_path / "bad.safetensors"
    _write_unpadded(f, {"a": torch.zeros(4), "b": torch.zeros(4)})
    raw = f.read_bytes().replace(b'"shape": [4], "data_offsets": [0, 16]', b'"shape": [5], "data_offsets": [0, 16]')
    f.write_bytes(raw)
    with pytest.raises(SdkitError, match="'a'.*needs 20 bytes but its offsets give 16"):
        formats.load_state_dict(f)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from Linux's /proc")
def test_mapped_tensors_are_not_read_until_used_and_release_hands_pages_back(tmp_path):
    f = tmp_path / "big.safetensors"
    save_file({"a": torch.arange(16 * 2**20, dtype=torch.float32).view(4096, 4096), "b": torch.ones(3)}, f)  # 64 MiB
    before = _rss_bytes()
    mapped = formats.load_state_dict(f)
    assert _rss_bytes() - before < 8 * 2**20  # mapping is not reading
    total = mapped["a"].sum().item()  # now every page of "a" is read
    read = _rss_bytes()
    a = mapped["a"]
    mapped.release(a.data_ptr(), a.nbytes)
    assert read - _rss_bytes() > 56 * 2**20
    assert mapped["a"].sum().item() == total  # released pages read back from the file, unchanged
    assert torch.equal(mapped["b"], torch.ones(3))


def test_mapped_tensors_never_write_to_the_file(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(1000)}, f)
    before = f.read_bytes()
    formats.load_state_dict(f)["a"].add_(1)  # a private copy-on-write map: the user's file stays as it was
    assert f.read_bytes() == before


@pytest.mark.parametrize("family, clue", [("sd1", "cond_stage_model.transformer."), ("sd2", "cond_stage_model.model."),
                                          ("sdxl", "conditioner.embedders.1.model.")])
def test_family_is_explained_by_the_tensor_that_decided_it(tiny_files, family, clue):
    specs, metadata = formats.read_specs(tiny_files[family])
    found, reason = formats.explain_family(specs, metadata)
    assert found == family and reason.startswith(f"tensor {clue}")


def test_shapes_family_comes_from_metadata():
    from sdkit.paths import find

    specs, metadata = formats.read_specs(find("checkpoints", "shapes-v1"))
    assert formats.explain_family(specs, metadata) == ("shapes", "metadata modelspec.architecture = 'sdkit-shapes-v1'")


def test_parts_table_counts_every_tensor_once(tiny_files):
    specs, _ = formats.read_specs(tiny_files["sdxl"])
    rows = {row["part"]: row for row in formats.parts(specs)}
    assert set(rows) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert sum(r["tensors"] for r in rows.values()) == len(specs)
    assert sum(r["parameters"] for r in rows.values()) == sum(s.numel for s in specs.values())
    assert rows["unet"]["prefix"] == "model.diffusion_model." and rows["unet"]["dtype"] == "float32"
    assert rows["vae"]["MiB"] == round(rows["vae"]["parameters"] * 4 / 2**20, 2)


def test_flux_all_in_one_layout_is_recognised_with_its_parts(tmp_path):
    from sdkit.testing import write_named

    path = write_named(tmp_path / "flux-aio.safetensors")
    result = formats.info(path)
    assert result["family"] == "flux"
    assert result["components"] == ["transformer", "vae", "text_encoder", "text_encoder_2"]
    assert {row["part"] for row in formats.parts(formats.read_specs(path)[0])} == set(result["components"])
