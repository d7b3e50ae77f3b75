"""Textual-inversion embeddings on tiny pipelines, in every file layout people share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdkit import checkpoints, embeddings
from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings, generate

FAST = GenerationSettings(prompt="a photo of a cat", seed=3, steps=3, width=32, height=32)


def sd1(tiny_files):
    return checkpoints.load(tiny_files["sd1"])


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(data, str(path))
    else:
        torch.save(data, path)
    return path


def rows(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["a1111_pt", "kohya_safetensors", "diffusers_bin"])
def test_every_layout_teaches_the_word(tiny_files, tmp_path, layout):
    vectors = rows(2 if layout != "diffusers_bin" else 1, 32)
    data = {"a1111_pt": {"string_to_param": {"*": vectors}, "name": "glowcat", "step": 100},
            "kohya_safetensors": {"emb_params": vectors},
            "diffusers_bin": {"<glowcat>": vectors[0]}}[layout]
    suffix = {"a1111_pt": ".pt", "kohya_safetensors": ".safetensors", "diffusers_bin": ".bin"}[layout]
    emb = embeddings.load(write(tmp_path / f"glowcat{suffix}", data))
    assert emb.name == "glowcat" and emb.count == len(vectors)
    pipe = sd1(tiny_files)
    embeddings.apply(pipe, emb)
    prompt = embeddings.expand(pipe, "a photo of glowcat, glowcatty")
    assert prompt == "a photo of " + " ".join(embeddings.tokens("glowcat", len(vectors))) + ", glowcatty"
    ids = pipe.tokenizer(prompt).input_ids
    table = pipe.text_encoder.get_input_embeddings().weight
    learned = [i for i in ids if i >= 49408]
    assert len(learned) == len(vectors)
    torch.testing.assert_close(table[learned].float(), vectors.to(table.dtype).float())


def test_the_word_changes_the_picture_in_prompt_and_negative(tiny_files, tmp_path):
    pipe = sd1(tiny_files)
    embeddings.apply(pipe, embeddings.load(write(tmp_path / "zorp.safetensors", {"emb_params": rows(3, 32) * 5})))
    plain = np.asarray(generate(pipe, FAST.replace(prompt="a photo of a"), progress=False)[0])
    with_word = np.asarray(generate(pipe, FAST.replace(prompt="a photo of a zorp"), progress=False)[0])
    negative = np.asarray(generate(pipe, FAST.replace(prompt="a photo of a", negative_prompt="zorp"),
                                   progress=False)[0])
    assert not np.array_equal(plain, with_word) and not np.array_equal(plain, negative)


def test_a_width_that_does_not_fit_is_refused_naming_both(tiny_files, tmp_path):
    pipe = sd1(tiny_files)
    before = pipe.text_encoder.get_input_embeddings().weight.shape
    picture = np.asarray(generate(pipe, FAST, progress=False)[0])
    path = write(tmp_path / "wide.safetensors", {"emb_params": rows(1, 1024)})
    with pytest.raises(SdkitError, match=r"1024-wide vectors \(SD2.x \(OpenCLIP-H\)\), but this model's text encoder "
                                         r"takes 32-wide"):
        embeddings.apply(pipe, embeddings.load(path))
    assert pipe.text_encoder.get_input_embeddings().weight.shape == before
    assert "wide" not in embeddings.loaded(pipe)
    assert np.array_equal(np.asarray(generate(pipe, FAST, progress=False)[0]), picture), "the next image is unchanged"


def test_sdxl_pairs_go_to_both_encoders(tiny_files, tmp_path):
    pipe = checkpoints.load(tiny_files["sdxl"])
    pair = {"clip_l": rows(2, 32, 1), "clip_g": rows(2, 64, 2)}
    embeddings.apply(pipe, embeddings.load(write(tmp_path / "xlword.safetensors", pair)))
    for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                    (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        ids = tokenizer.convert_tokens_to_ids(embeddings.tokens("xlword", 2))
        table = encoder.get_input_embeddings().weight
        torch.testing.assert_close(table[ids].float(), pair[key].to(table.dtype).float())
    image = generate(pipe, FAST.replace(prompt="xlword"), progress=False)[0]
    assert image.size == (32, 32)


def test_an_sd1_embedding_on_sdxl_says_it_needs_a_pair(tiny_files, tmp_path):
    pipe = checkpoints.load(tiny_files["sdxl"])
    with pytest.raises(SdkitError, match="needs a clip_l \\+ clip_g pair"):
        embeddings.apply(pipe, embeddings.load(write(tmp_path / "one.safetensors", {"emb_params": rows(1, 32)})))


def test_a_lora_in_the_embeddings_folder_is_named_for_what_it_is(tmp_path):
    path = write(tmp_path / "lora.safetensors", {"lora_unet_x.lora_down.weight": rows(2, 8),
                                                 "lora_unet_x.lora_up.weight": rows(8, 2)})
    with pytest.raises(SdkitError, match="is not a textual-inversion embedding"):
        embeddings.load(path)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"string_to_param": {"*": Payload()}}))
    with pytest.raises(SdkitError):
        embeddings.load(path)
    assert not (tmp_path / "pwned").exists()


def test_words_from_the_embeddings_folder_are_learned_when_a_prompt_uses_them(tiny_files, tmp_path, monkeypatch):
    write(tmp_path / "embeddings" / "fizzword.safetensors", {"emb_params": rows(1, 32)})
    write(tmp_path / "embeddings" / "unused.safetensors", {"emb_params": rows(1, 32)})
    monkeypatch.setenv("SDKIT_MODELS", str(tmp_path))
    pipe = sd1(tiny_files)
    generate(pipe, FAST.replace(prompt="a photo", negative_prompt="fizzword"), progress=False)
    assert "fizzword" in embeddings.loaded(pipe) and "unused" not in embeddings.loaded(pipe)


def test_cli_info_describes_an_embedding(tmp_path, capsys):
    import json

    from sdkit.__main__ import main

    write(tmp_path / "embeddings" / "glow.safetensors", {"emb_params": rows(3, 768)})
    main(["--root", str(tmp_path), "info", "glow", "--kind", "embeddings", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["word"] == "glow" and result["vectors"] == 3 and result["family"] == "sd1"


def test_png_text_carries_ti_hashes(tiny_files, tmp_path, monkeypatch):
    import hashlib

    path = write(tmp_path / "embeddings" / "hashword.safetensors", {"emb_params": rows(1, 32)})
    monkeypatch.setenv("SDKIT_MODELS", str(tmp_path))
    image = generate(sd1(tiny_files), FAST.replace(prompt="a hashword"), progress=False)[0]
    assert image.sdkit_settings.extra["TI hashes"] == f"hashword: {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    plain = generate(sd1(tiny_files), FAST.replace(prompt="a cat"), progress=False)[0]
    assert "TI hashes" not in plain.sdkit_settings.extra


def test_remove_reads_the_word_as_text_again_and_restore_brings_it_back(tiny_files, tmp_path, monkeypatch):
    write(tmp_path / "embeddings" / "quaxel.safetensors", {"emb_params": rows(2, 32) * 5})
    monkeypatch.setenv("SDKIT_MODELS", str(tmp_path))
    pipe = sd1(tiny_files)
    run = lambda: np.asarray(generate(pipe, FAST.replace(prompt="a photo of a quaxel"), progress=False)[0])  # noqa: E731
    used = run()
    assert "quaxel" in embeddings.loaded(pipe)
    embeddings.remove(pipe, "quaxel")
    plain = run()
    assert "quaxel" not in embeddings.loaded(pipe), "a removed word is not loaded again from the folder"
    assert not np.array_equal(used, plain)
    embeddings.restore(pipe, "quaxel")
    assert np.array_equal(run(), used)


def test_a_weighted_embedding_word_is_expanded_inside_the_brackets(tiny_files, tmp_path):
    pipe = sd1(tiny_files)
    embeddings.apply(pipe, embeddings.load(write(tmp_path / "blorp.safetensors", {"emb_params": rows(2, 32) * 5})))
    from sdkit import prompts

    packed, count = prompts.chunks(pipe.tokenizer, "a (blorp:1.3) cat", expand=lambda s: embeddings.expand(pipe, s))
    new = pipe.tokenizer.convert_tokens_to_ids(embeddings.tokens("blorp", 2))
    weights = [w for t, w in zip(packed[0].tokens, packed[0].weights) if t in new]
    assert weights == [1.3, 1.3] and count == 4


def test_the_panel_picker_uses_the_chosen_file_and_removes_the_others(tiny_files, tmp_path, monkeypatch):
    for word in ("glimmer", "shadowy"):
        write(tmp_path / "embeddings" / f"{word}.safetensors", {"emb_params": rows(1, 32)})
    pipe = sd1(tiny_files)
    group = embeddings.control_group(root=tmp_path, name="glimmer")
    values = [v for _, v in group.choice.options]
    assert values[0] == "" and {"glimmer", "shadowy"} <= set(values)  # (none), then the folder's files
    monkeypatch.setenv("SDKIT_MODELS", str(tmp_path))
    settings = FAST.replace(prompt="glimmer and shadowy")
    group.prepare(pipe, settings)
    generate(pipe, settings, progress=False)
    assert "glimmer" in embeddings.loaded(pipe) and "shadowy" not in embeddings.loaded(pipe)
    group.choice.value = ""
    group.prepare(pipe, settings)
    generate(pipe, settings, progress=False)
    assert not {"glimmer", "shadowy"} & set(embeddings.loaded(pipe))
