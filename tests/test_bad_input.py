"""The bad-input table: one row per way a learner's input can be wrong.

Every row checks the same four things: the error is an SdkitError (never a crash of another type), its message
names the file or field and comes with a fix, nothing on disk changed (the row's own files and the bundled models),
and the loaded shapes-v1 pipeline still paints exactly the picture it painted before. Rows marked `ok` are inputs
A1111 accepts: they must work, not fail.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdkit import checkpoints, controlnet, embeddings, formats, loras, metadata, paths, pose, upscale, vae
from sdkit.__main__ import main
from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings, generate

BUNDLED = paths.BUNDLED_ROOT
RUN = GenerationSettings(prompt="a red circle on a white background", seed=11, steps=3, width=64, height=64)


@pytest.fixture(scope="module")
def shapes():
    return checkpoints.load("shapes-v1")


@pytest.fixture(scope="module")
def reference(shapes):
    return np.asarray(generate(shapes, RUN, progress=False)[0])


def _snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file under the folders with its size and modification time."""
    found = {}
    for folder in folders:
        for top, _dirs, files in os.walk(folder):  # symlinks not followed: a loop is listed once
            for name in files:
                path = Path(top) / name
                if not path.is_symlink():
                    stat = path.stat()
                    found[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return found


def _text_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _loop(tmp: Path) -> Path:
    (tmp / "loras").mkdir()
    os.symlink(tmp / "loras", tmp / "loras" / "loop")
    return tmp


# --- making bad files -------------------------------------------------------------------------------------------


def _safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    """A file with exactly this safetensors header and data (no checks: for writing broken files)."""
    raw = __import__("json").dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _tensor_file(path: Path, tensors: dict, metadata_: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata_)
    return path


class _Payload:
    """Unpickling this writes a file: proof that code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def _evil(path: Path, *, nest: str | None = None) -> Path:
    """A .pt/.pth/.ckpt whose unpickling would create `pwned` next to it."""
    payload = {"weight": torch.zeros(2), "x": _Payload(path.parent / "pwned")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({nest: payload} if nest else payload, path)
    return path


def _copy_with_nan(source: Path, target: Path) -> Path:
    """A copy of a checkpoint with one UNet weight set to NaN."""
    state, meta = formats.read_tensors(source)
    name = next(k for k in state if k.startswith("model.diffusion_model.") and k.endswith(".weight"))
    state[name] = state[name].clone()
    state[name].view(-1)[0] = math.nan
    return _tensor_file(target, {k: v.contiguous() for k, v in state.items()}, meta)


# --- the rows ---------------------------------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    act: Callable  # (tmp_path, shapes) -> a zero-argument callable that does the bad thing
    expect: str | None  # a regex the error must match; None: it must work


def _made(setup: Callable[[Path], object], action: Callable):
    """A row's act: make its input first (outside the checked part), then act on it: action(made, pipe)."""
    return lambda tmp, pipe: (lambda made: (lambda: action(made, pipe)))(setup(tmp))


def _load_ckpt(file: Callable[[Path], Path]):
    return _made(file, lambda path, _pipe: checkpoints.load(path))


def _on_pipe(loader, file: Callable[[Path], Path]):
    return _made(file, loader)


def _settings(**changes):
    return lambda _tmp, pipe: (lambda: generate(pipe, RUN.replace(**changes), progress=False))


def _prompt(text: str):
    return _settings(prompt=text)


def _cli(*argv: str):
    return lambda tmp, _pipe: (lambda: _run_cli([a.replace("{tmp}", str(tmp)) for a in argv]))


def _run_cli(argv: list[str]) -> None:
    """main(argv) as the shell runs it: an exit code other than 0 becomes an SdkitError with what it printed."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: usage and one line
            code = exit_.code
    text = err.getvalue()
    assert "Traceback" not in text, text
    if code:
        lines = [line for line in text.splitlines() if line.strip()]
        raise SdkitError(f"exit {code}: {' '.join(lines[-2:])}", fix="(the CLI's own line)")


def _png_with(tmp: Path, texts: dict[str, str]) -> Path:
    path = tmp / "picture.png"
    metadata.save_png(Image.new("RGB", (8, 8)), path=path, texts=texts)
    return path


ROWS = [
    # model files: damaged, foreign or hostile safetensors
    Row("zero-byte checkpoint", _load_ckpt(lambda t: (t / "empty.safetensors").touch() or t / "empty.safetensors"),
        r"empty.safetensors is empty \(0 bytes\)"),
    Row("truncated checkpoint", _load_ckpt(lambda t: (t / "half.safetensors").write_bytes(
        (BUNDLED / "checkpoints/shapes-v1.safetensors").read_bytes()[:3_000_000]) and t / "half.safetensors"),
        r"half.safetensors is truncated"),
    Row("web page saved as a model", _load_ckpt(lambda t: (t / "page.safetensors").write_text(
        "<!DOCTYPE html><html>" + " " * 100) and t / "page.safetensors"), r"page.safetensors .*web page"),
    Row("git-lfs pointer", _load_ckpt(lambda t: (t / "lfs.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n" + " " * 64) and t / "lfs.safetensors"),
        r"Git LFS pointer"),
    Row("header is not JSON", _load_ckpt(lambda t: (t / "x.safetensors").write_bytes(
        struct.pack("<Q", 5) + b"{{{{{" + b"\0" * 8) and t / "x.safetensors"), r"x.safetensors has a damaged"),
    Row("unknown dtype", _load_ckpt(lambda t: _safetensors(t / "d.safetensors", {
        "a": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)), r"'a' has dtype 'F7'"),
    Row("huge declared shape", _load_ckpt(lambda t: _safetensors(t / "h.safetensors", {
        "a": {"dtype": "F32", "shape": [10**12, 10**6], "data_offsets": [0, 8]}}, b"\0" * 8)), r"'a' .*needs"),
    Row("overlapping offsets", _load_ckpt(lambda t: _safetensors(t / "o.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)), r"'a' and 'b' overlap"),
    Row("duplicate offsets", _load_ckpt(lambda t: _safetensors(t / "dup.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)), r"overlap"),
    Row("negative offsets", _load_ckpt(lambda t: _safetensors(t / "n.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8)), r"'a' has a damaged shape"),
    Row("offsets past the end", _load_ckpt(lambda t: _safetensors(t / "p.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [1000, 1008]}}, b"\0" * 8)), r"p.safetensors is truncated"),
    Row("data bytes belonging to no tensor (found by make fuzz)", _load_ckpt(lambda t: _safetensors(
        t / "g.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12)),
        r"4 bytes after its last tensor belong to none"),
    Row("metadata is not a table", _load_ckpt(lambda t: _safetensors(t / "m.safetensors", {
        "__metadata__": ["x"], "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)),
        r"__metadata__ is not a table"),
    Row("not a weight-file extension", _load_ckpt(lambda t: (t / "notes.txt").write_text("hi") and t / "notes.txt"),
        r"notes.txt: .txt is not a weight-file extension"),
    Row("NaN weight in a checkpoint", _load_ckpt(lambda t: _copy_with_nan(
        BUNDLED / "checkpoints/shapes-v1.safetensors", t / "nan.safetensors")), r"nan.safetensors: the unet weight .* NaN"),
    Row("a LoRA as a checkpoint", _load_ckpt(lambda t: BUNDLED / "loras/outlines.safetensors"),
        r"outlines.safetensors"),
    # add-ons that do not fit, or hold NaN/inf
    Row("NaN in a LoRA", _on_pipe(lambda f, p: loras.load(f), lambda t: _tensor_file(t / "l.safetensors", {
        "lora_unet_x.lora_down.weight": torch.full((2, 4), math.nan), "lora_unet_x.lora_up.weight": torch.ones(4, 2)})),
        r"l.safetensors: tensor .* NaN"),
    Row("infinity in an embedding", _on_pipe(lambda f, p: embeddings.load(f), lambda t: _tensor_file(
        t / "e.safetensors", {"emb_params": torch.full((2, 64), math.inf)})), r"e.safetensors: tensor 'emb_params' .*infinite"),
    Row("embedding of the wrong width", _on_pipe(lambda f, p: embeddings.apply(p, embeddings.load(f)),
                                                 lambda t: _tensor_file(t / "w.safetensors", {"emb_params": torch.zeros(2, 768)})),
        r"w.safetensors.*768"),
    Row("LoRA for another model", _on_pipe(lambda f, p: loras.apply(p, [(loras.load(f), 1.0)]),
                                           lambda t: _tensor_file(t / "other.safetensors", {
                                               "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 320),
                                               "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 2)})),
        r"other.safetensors"),
    Row("a LoRA as a VAE", _on_pipe(lambda f, p: vae.load(f), lambda t: BUNDLED / "loras/outlines.safetensors"),
        r"outlines.safetensors is not a VAE.*LoRA"),
    Row("random tensors as an upscaler", _on_pipe(lambda f, p: upscale.load(f), lambda t: _tensor_file(
        t / "u.safetensors", {"foo.weight": torch.zeros(3, 3)})), r"u.safetensors.*spandrel"),
    Row("a LoRA as a ControlNet", _on_pipe(lambda f, p: controlnet.load(f, pipe=p),
                                           lambda t: BUNDLED / "loras/outlines.safetensors"),
        r"outlines.safetensors is not a ControlNet.*LoRA"),
    # pickles that would run code, in every place a pickle enters
    Row("malicious checkpoint .ckpt", _load_ckpt(lambda t: _evil(t / "evil.ckpt", nest="state_dict")), r"evil.ckpt refused"),
    Row("malicious LoRA .pt", _on_pipe(lambda f, p: loras.load(f), lambda t: _evil(t / "evil.pt")), r"evil.pt refused"),
    Row("malicious embedding .pt", _on_pipe(lambda f, p: embeddings.load(f), lambda t: _evil(t / "evil.pt")),
        r"evil.pt refused"),
    Row("malicious VAE .pt", _on_pipe(lambda f, p: vae.load(f), lambda t: _evil(t / "evil.pt")), r"evil.pt refused"),
    Row("malicious upscaler .pth", _on_pipe(lambda f, p: upscale.load(f), lambda t: _evil(t / "evil.pth")),
        r"evil.pth refused"),
    Row("malicious ControlNet .pth", _on_pipe(lambda f, p: controlnet.load(f, pipe=p), lambda t: _evil(t / "evil.pth")),
        r"evil.pth refused"),
    Row("legacy (non-zip) pickle with code", _on_pipe(lambda f, p: loras.load(f), lambda t: (
        torch.save({"x": _Payload(t / "pwned")}, t / "old.pt", _use_new_zipfile_serialization=False), t / "old.pt")[1]),
        r"old.pt refused"),
    Row("TorchScript archive", _load_ckpt(lambda t: (torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)),
                                                                     str(t / "script.pt")), t / "script.pt")[1]),
        r"script.pt"),
    Row("pickle holding a list", _on_pipe(lambda f, p: upscale.load(f), lambda t: (
        torch.save([torch.zeros(2)], t / "list.pth"), t / "list.pth")[1]), r"list.pth holds a list"),
    Row("plain pickle (not torch)", _on_pipe(lambda f, p: loras.load(f), lambda t: (
        (t / "plain.pt").write_bytes(pickle.dumps({"a": 1})), t / "plain.pt")[1]), r"plain.pt"),
    # prompts
    Row("unbalanced brackets", _prompt("((a red circle [on a white"), None),
    Row("weight that is not a number", _prompt("(red:1.2.3) circle"), r"prompt weight '1.2.3'"),
    Row("absurd weight", _prompt("(red:99999) circle"), r"prompt weight 99999 is far outside"),
    Row("10,000-token prompt", _prompt("red " * 10_000), None),
    Row("control characters and direction overrides", _prompt("a red\x00\x1b[31m circle\u202e\u200b"), None),
    Row("a LoRA tag naming nothing", _prompt("<lora:nope:1> a red circle"), r"No loras model named 'nope'"),
    # settings
    Row("cfg NaN", _settings(cfg=math.nan), r"cfg=nan is not a finite number"),
    Row("cfg infinite", _settings(cfg=math.inf), r"cfg=inf is not a finite number"),
    Row("cfg negative", _settings(cfg=-3.0), r"cfg=-3 is outside 0..100"),
    Row("steps infinite", _settings(steps=math.inf), r"steps=inf is not a whole number"),
    Row("steps zero", _settings(steps=0), r"steps=0 is not usable"),
    Row("steps huge", _settings(steps=10**9), r"steps=1000000000 is more than sdkit runs"),
    Row("width negative", _settings(width=-64), r"width=-64 is not usable"),
    Row("width NaN", _settings(width=math.nan), r"width=nan is not a whole number"),
    Row("size that does not fit a model", _settings(width=8192, height=8192), r"width=8192 is not usable"),
    Row("seed beyond 32 bits", _settings(seed=2**40), r"seed=1099511627776 is out of range"),
    Row("batch of zero", _settings(batch_size=0), r"batch_size=0 is not usable"),
    Row("batch huge", _settings(batch_size=10**6), r"batch_size=1000000 is more than"),
    Row("strength zero with an init image", _settings(strength=0.0, init_image="x.png"), r"strength=0.0 is not usable"),
    Row("hires scale 10", _settings(hires_scale=10.0), r"hires_scale=10.0 is not usable"),
    Row("unknown sampler", _settings(sampler="fastest"), r"Unknown sampler 'fastest'"),
    Row("clip skip beyond the encoder", _settings(clip_skip=50), r"clip_skip=50 is more than"),
    Row("init image that is not a picture", _made(lambda t: _text_file(t / "x.png", "no"), lambda f, p: generate(
        p, RUN.replace(init_image=str(f)), progress=False)), r"x.png: cannot be read"),
    # PNG metadata
    Row("PNG without parameters", _made(lambda t: _png_with(t, {"Comment": "hi"}),
                                        lambda f, p: metadata.read_parameters(f)), r"picture.png"),
    Row("parameters text malformed", _made(lambda t: _png_with(t, {"parameters": "a cat\nSteps: many, Seed: x"}),
                                           lambda f, p: metadata.read_parameters(f)), r"'Steps: many' is not a whole number"),
    Row("parameters CFG NaN", lambda t, p: (lambda: metadata.parse_parameters("a\nSteps: 20, CFG scale: nan")),
        r"'CFG scale: nan' is not a number"),
    Row("hostile unicode in parameters", _made(lambda t: _png_with(t, {"parameters": "a \u202ered cat\u0301\u200b\n"
                                                                                 "Steps: 20, Seed: 3"}),
                                               lambda f, p: metadata.read_parameters(f)), None),
    Row("parameters text of 2 MB", _made(lambda t: _png_with(t, {"parameters": "a" * 2_000_000 + "\nSteps: 20"}),
                                         lambda f, p: metadata.read_parameters(f)), None),
    Row("a JPEG named .png", _made(lambda t: (Image.new("RGB", (8, 8)).save(t / "fake.png", format="JPEG"),
                                              t / "fake.png")[1], lambda f, p: metadata.read_parameters(f)), r"fake.png"),
    # folders
    Row("models root missing", lambda t, p: (lambda: paths.ModelPaths.from_root(t / "nowhere")), r"nowhere does not exist"),
    Row("models root is a file", _made(lambda t: _text_file(t / "file", "x"), lambda f, p: paths.ModelPaths.from_root(f)),
        r"file does not exist or is not a folder"),
    Row("symlink loop in the LoRA folder", _made(_loop, lambda root, p: paths.ModelPaths([root]).find("loras", "nope")),
        r"No loras model named 'nope'"),
    Row("models root is /", lambda t, p: (lambda: paths.ModelPaths([Path("/")]).find("checkpoints", "nope")),
        r"No checkpoints model named 'nope'"),
    Row("output folder is a file", _made(lambda t: _text_file(t / "out", "x"), lambda f, p: metadata.save_image(
        Image.new("RGB", (8, 8)), settings=RUN, out_dir=f)), r"out is a file"),
    Row("pose preset unknown", lambda t, p: (lambda: pose.preset("flying")), r"flying"),
    # the command line
    Row("CLI: generate without a prompt", _cli("generate", "--model", "shapes-v1"), r"--prompt"),
    Row("CLI: unknown subcommand", _cli("paint"), r"invalid choice: 'paint'"),
    Row("CLI: steps not a number", _cli("generate", "--model", "shapes-v1", "--prompt", "x", "--steps", "ten"),
        r"--steps: invalid int value: 'ten'"),
    Row("CLI: info on a missing file", _cli("info", "{tmp}/none.safetensors"), r"none.safetensors does not exist"),
    Row("CLI: params on a missing PNG", _cli("params", "{tmp}/none.png"), r"none.png"),
    Row("CLI: upscale without --model", _cli("upscale", "x.png"), r"--model"),
    Row("CLI: pose without an output", _cli("pose", "--preset", "kneeling"), r"--out"),
    Row("CLI: evaluate an unknown world", _cli("evaluate", "cars"), r"invalid choice: 'cars'"),
    Row("CLI: bench with an unknown flag", _cli("bench", "--fastest"), r"unrecognized arguments: --fastest"),
    Row("CLI: device with an unknown flag", _cli("device", "--gpu"), r"unrecognized arguments: --gpu"),
    Row("CLI: upscale a file that is not a picture", _cli("upscale", "{tmp}/none.png", "--model", "4x_shapes_compact"),
        r"none.png"),
    Row("CLI: models on a missing root", _cli("--root", "{tmp}/nowhere", "models"), r"nowhere does not exist"),
    Row("CLI: generate with a ControlNet but no image", _cli("generate", "--model", "shapes-v1", "--prompt", "x",
                                                             "--controlnet", "shapes-v1-layout"),
        r"--controlnet needs a --control-image"),
]


def test_the_table_has_at_least_40_distinct_rows():
    assert len(ROWS) >= 40 and len({row.id for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input(row: Row, tmp_path, shapes, reference):
    action = row.act(tmp_path, shapes)
    before = _snapshot(tmp_path, BUNDLED)
    if row.expect is None:
        action()
    else:
        with pytest.raises(SdkitError, match=row.expect) as caught:
            action()
        assert caught.value.fix, "every error says what to do"
    assert _snapshot(tmp_path, BUNDLED) == before, "nothing on disk changed"
    assert not (tmp_path / "pwned").exists(), "no code from a file ran"
    again = np.asarray(generate(shapes, RUN, progress=False)[0])
    assert np.array_equal(again, reference), "the loaded pipeline still paints the same picture"
