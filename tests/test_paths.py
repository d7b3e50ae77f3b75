from __future__ import annotations

from pathlib import Path

import pytest

from sdkit import paths
from sdkit.errors import SdkitError


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_sdkit_layout_lookup_by_name_stem_and_path(tmp_path):
    f = touch(tmp_path / "checkpoints" / "sub" / "Model.safetensors")
    touch(tmp_path / "checkpoints" / "notes.txt")
    reg = paths.ModelPaths([tmp_path])
    assert reg.list("checkpoints") == ["sub/Model.safetensors"]
    assert reg.find("checkpoints", "sub/Model.safetensors") == f
    assert reg.find("checkpoints", "sub/Model") == f
    assert reg.find("checkpoints", "model") == f
    assert reg.find("checkpoints", f) == f


def test_missing_name_lists_what_is_there(tmp_path):
    touch(tmp_path / "loras" / "a.safetensors")
    touch(tmp_path / "loras" / "b.pt")
    with pytest.raises(SdkitError) as err:
        paths.ModelPaths([tmp_path]).find("loras", "nope")
    assert "nope" in str(err.value) and "a.safetensors, b.pt" in str(err.value)
    assert str(tmp_path / "loras") in str(err.value)


def test_comfyui_install_and_aliases(tmp_path):
    touch(tmp_path / "models" / "checkpoints" / "x.safetensors")
    touch(tmp_path / "models" / "unet" / "flux.gguf")
    touch(tmp_path / "models" / "clip" / "t5.safetensors")
    reg = paths.ModelPaths([tmp_path])
    assert reg.list("checkpoints") == ["x.safetensors"]
    assert reg.list("diffusion_models") == ["flux.gguf"]
    assert reg.list("text_encoders") == ["t5.safetensors"]


def test_a1111_install_is_recognised(tmp_path):
    touch(tmp_path / "models" / "Stable-diffusion" / "sd15.safetensors")
    touch(tmp_path / "models" / "Lora" / "style.safetensors")
    touch(tmp_path / "embeddings" / "word.pt")
    touch(tmp_path / "models" / "ESRGAN" / "4x.pth")
    touch(tmp_path / "models" / "VAE" / "vae.safetensors")
    touch(tmp_path / "models" / "ControlNet" / "cn.safetensors")
    touch(tmp_path / "models" / "VAE-approx" / "model.pt")
    touch(tmp_path / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads" / "openpose" / "body_pose_model.pth")
    for root in (tmp_path, tmp_path / "models"):
        reg = paths.ModelPaths([root])
        assert reg.all() | {} == {
            "checkpoints": ["sd15.safetensors"], "loras": ["style.safetensors"], "embeddings": ["word.pt"],
            "controlnet": ["cn.safetensors"], "vae": ["vae.safetensors"], "upscale_models": ["4x.pth"],
            "vae_approx": ["model.pt"], "diffusion_models": [], "text_encoders": [],
            "annotators": ["openpose/body_pose_model.pth"],
        }


def test_env_root_comes_first_then_bundled(tmp_path, monkeypatch):
    monkeypatch.setenv("SDKIT_MODELS", str(tmp_path))
    roots = paths.default_roots()
    assert roots[0] == tmp_path and roots[-1] == paths.BUNDLED_ROOT


def test_bad_root_and_unknown_kind(tmp_path):
    with pytest.raises(SdkitError, match="does not exist"):
        paths.ModelPaths.from_root(tmp_path / "missing")
    with pytest.raises(SdkitError, match="Unknown model folder 'lora'"):
        paths.ModelPaths([tmp_path]).folders("lora")


def test_missing_explicit_path_is_not_replaced_by_a_namesake(tmp_path):
    touch(tmp_path / "checkpoints" / "x.safetensors")
    reg = paths.ModelPaths([tmp_path])
    with pytest.raises(SdkitError, match="does not exist"):
        reg.find("checkpoints", str(tmp_path / "elsewhere" / "x.ckpt"))
    with pytest.raises(SdkitError, match="No checkpoints model named 'other/x'"):
        reg.find("checkpoints", "other/x")


def test_folder_in_cwd_does_not_hide_a_model(tmp_path, monkeypatch):
    f = touch(tmp_path / "root" / "checkpoints" / "juggernaut.safetensors")
    (tmp_path / "cwd" / "juggernaut").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    assert paths.ModelPaths([tmp_path / "root"]).find("checkpoints", "juggernaut") == f


def test_symlinked_subfolders_are_followed(tmp_path):
    touch(tmp_path / "shared" / "a.safetensors")
    (tmp_path / "root" / "loras").mkdir(parents=True)
    (tmp_path / "root" / "loras" / "linked").symlink_to(tmp_path / "shared")
    assert paths.ModelPaths([tmp_path / "root"]).list("loras") == ["linked/a.safetensors"]
