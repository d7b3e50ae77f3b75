"""Textual-inversion embeddings: new words for the text encoder, from A1111, kohya, SDXL and diffusers files.

    star = embeddings.load("shapes-star")     # models/embeddings/shapes-star.pt (or a path)
    embeddings.apply(pipe, star)               # now the word "shapes-star" means what the file learned
    generate(pipe, settings.replace(prompt="a red shapes-star on a white background"))

As in A1111, the file name is the word, it works in the negative prompt too, and an embedding of several vectors
stands for several tokens. Inside, each word becomes tokens no real text can contain (`<shapes-star:0>`, ...), so
"star" in another word never triggers it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sdkit import formats
from sdkit.errors import SdkitError
from sdkit.paths import ModelPaths

# Which text encoder of a pipeline each kind of vectors belongs to, by the encoder's width.
WIDTH_FAMILY = {768: "SD1.x (CLIP-L)", 1024: "SD2.x (OpenCLIP-H)", 1280: "SDXL's second encoder (OpenCLIP-G)",
                64: "shapes-world"}


@dataclass
class Embedding:
    """An embedding file, read: its word and its vectors (per text encoder for SDXL files)."""

    name: str
    path: Path
    vectors: dict[str, torch.Tensor]  # "clip_l" / "clip_g" for SDXL pairs, "*" for one-encoder files

    @property
    def count(self) -> int:
        """How many tokens the word stands for."""
        return next(iter(self.vectors.values())).shape[0]


def _as_rows(value, *, path: Path, key: str) -> torch.Tensor:
    """A tensor of vectors as (n, width)."""
    if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or not value.is_floating_point():
        raise SdkitError(f"{path.name}: {key} is not a list of vectors ({getattr(value, 'shape', type(value))}).",
                         fix="use an A1111/kohya textual-inversion file (emb_params or string_to_param)")
    return value.detach().float().reshape(-1, value.shape[-1])


def _vectors(data: dict, *, path: Path) -> dict[str, torch.Tensor]:
    """The vectors in any of the layouts people share."""
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise SdkitError(f"{path.name}: string_to_param is empty.", fix="the file is damaged; download it again")
        return {"*": _as_rows(next(iter(params.values())), path=path, key="string_to_param")}
    if "emb_params" in data:  # kohya / A1111 .safetensors
        return {"*": _as_rows(data["emb_params"], path=path, key="emb_params")}
    if "clip_l" in data and "clip_g" in data:  # SDXL pair
        return {k: _as_rows(data[k], path=path, key=k) for k in ("clip_l", "clip_g")}
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers learned_embeds: {"<token>": vector}
        key, value = next(iter(tensors.items()))
        return {"*": _as_rows(value, path=path, key=key)}
    raise SdkitError(f"{path.name} is not a textual-inversion embedding (expected string_to_param, emb_params, "
                     f"clip_l + clip_g, or one learned vector; found {', '.join(list(data)[:5]) or 'nothing'}).",
                     fix="put LoRAs in loras/ and embeddings in embeddings/; `python -m sdkit info FILE` says which")


def load(name_or_path: str | Path, *, root: str | Path | None = None) -> Embedding:
    """Read an embedding (by name in the embeddings folder, or a path); its file name is its word."""
    path = ModelPaths.from_root(root).find("embeddings", name_or_path)
    data, _ = formats.read_tensors(path, nested=True)  # A1111 .pt files nest their vectors in string_to_param
    return Embedding(name=path.stem, path=path, vectors=_vectors(data, path=path))


def _encoders(pipe) -> list[tuple[str, object, object]]:
    """(which vectors, tokenizer, text encoder) for each text encoder of the pipeline."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return [("clip_l", pipe.tokenizer, pipe.text_encoder), ("clip_g", pipe.tokenizer_2, pipe.text_encoder_2)]
    return [("*", pipe.tokenizer, pipe.text_encoder)]


def tokens(name: str, count: int) -> list[str]:
    """The tokens a word of `count` vectors becomes."""
    return [f"<{name}:{i}>" for i in range(count)]


def apply(pipe, embedding: Embedding) -> None:
    """Teach the pipeline's text encoder(s) the embedding's word; a width that does not fit is refused first."""
    plan = []
    for which, tokenizer, encoder in _encoders(pipe):
        vectors = embedding.vectors.get(which)
        if vectors is None and which == "clip_l" and "*" in embedding.vectors:
            vectors = embedding.vectors["*"]  # an SD1 embedding: only SDXL's first encoder could take it
        width = encoder.get_input_embeddings().weight.shape[1]
        if vectors is None:
            raise SdkitError(f"{embedding.path.name} has vectors for one text encoder; this SDXL model needs a "
                             f"clip_l + clip_g pair.", fix="use an SDXL embedding (it holds clip_l and clip_g)")
        if vectors.shape[1] != width:
            raise SdkitError(f"{embedding.path.name} has {vectors.shape[1]}-wide vectors "
                             f"({WIDTH_FAMILY.get(vectors.shape[1], 'another model')}), but this model's text encoder "
                             f"takes {width}-wide ones ({WIDTH_FAMILY.get(width, 'this model')}); nothing was changed.",
                             fix="use an embedding made for this checkpoint's family")
        plan.append((tokenizer, encoder, vectors))
    names = tokens(embedding.name, embedding.count)
    with torch.no_grad():
        for tokenizer, encoder, vectors in plan:
            tokenizer.add_tokens([t for t in names if t not in tokenizer.get_vocab()])
            ids = tokenizer.convert_tokens_to_ids(names)
            table = encoder.get_input_embeddings()
            if max(ids) >= table.weight.shape[0]:
                encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set just below
                table = encoder.get_input_embeddings()
            table.weight[ids] = vectors.to(table.weight.dtype)
    pipe.__dict__.setdefault("_sdkit_embeddings", {})[embedding.name] = embedding
    pipe.__dict__.setdefault("_sdkit_embeddings_off", set()).discard(embedding.name)


def _word(name: str) -> str:
    """A regex for `name` as a whole word of a prompt (as A1111 matches embedding names)."""
    return rf"(?<![\w-]){re.escape(name)}(?![\w-])"


def _uses(prompts: tuple[str, ...], name: str) -> bool:
    """Whether any prompt uses `name` as a word."""
    return any(re.search(_word(name), p) for p in prompts)


def expand(pipe, prompt: str) -> str:
    """The prompt with each embedding's word replaced by its tokens (whole words only, as A1111 matches them)."""
    known = pipe.__dict__.get("_sdkit_embeddings", {})
    for name, embedding in sorted(known.items(), key=lambda item: -len(item[0])):
        prompt = re.sub(_word(name), lambda _m, e=embedding: " ".join(tokens(e.name, e.count)), prompt)
    return prompt


def remove(pipe, *names: str) -> None:
    """Stop using these words' embeddings (all when none are named): the words read as plain text again, and prompts
    do not load them from the folder until restore() or apply()."""
    known = pipe.__dict__.setdefault("_sdkit_embeddings", {})
    off = pipe.__dict__.setdefault("_sdkit_embeddings_off", set())
    for name in names or list(known):
        known.pop(name, None)
        off.add(name)


def restore(pipe, *names: str) -> None:
    """Let prompts load these embeddings from the folder again (all removed ones when none are named)."""
    off = pipe.__dict__.setdefault("_sdkit_embeddings_off", set())
    for name in names or list(off):
        off.discard(name)


def loaded(pipe) -> list[str]:
    """The words this pipeline has learned from embeddings."""
    return list(pipe.__dict__.get("_sdkit_embeddings", {}))


def from_prompt(pipe, *prompts: str, root: str | Path | None = None) -> list[str]:
    """Apply every embedding in the embeddings folders whose name a prompt uses as a word (A1111's way); their names."""
    registry = ModelPaths.from_root(root)
    used = []
    for file in registry.list("embeddings"):
        name = Path(file).stem
        if name in loaded(pipe) or name in pipe.__dict__.get("_sdkit_embeddings_off", ()) or not _uses(prompts, name):
            continue
        apply(pipe, load(registry.find("embeddings", file)))
        used.append(name)
    return used


def describe(embedding: Embedding) -> dict:
    """What `python -m sdkit info` says about an embedding file."""
    widths = {key: rows.shape[1] for key, rows in embedding.vectors.items()}
    family = "sdxl" if "clip_g" in widths else {768: "sd1", 1024: "sd2", 64: "shapes"}.get(widths.get("*"), "unknown")
    return {"file": str(embedding.path), "type": "textual-inversion embedding", "word": embedding.name,
            "vectors": embedding.count, "widths": widths, "family": family}


def hashes(pipe, *prompts: str) -> str:
    """The "TI hashes" text A1111 writes for the embeddings these prompts use ("word: 0123456789ab, ..."), or ""."""
    used = [e for name, e in pipe.__dict__.get("_sdkit_embeddings", {}).items()
            if _uses(prompts, name)]
    return ", ".join(f"{e.name}: {formats.sha256(e.path)[:12]}" for e in used)


# --- the panel's embedding picker ------------------------------------------------------------------------------


def control_group(*, root: str | Path | None = None, name: str = ""):
    """A panel group: pick which embedding file the model may use; the others are removed, so their words read as
    plain text (what a learner sees without the file). The word goes in the prompt, as in A1111."""
    import ipywidgets as w

    from sdkit.widgets import ControlGroup

    registry = ModelPaths.from_root(root)
    names = [Path(n).stem for n in registry.list("embeddings")]

    class EmbeddingGroup(ControlGroup):
        title = "Embedding"

        def __init__(self) -> None:
            self.choice = w.Dropdown(options=[("(none: words read as plain text)", "")] + [(n, n) for n in names],
                                     value=name if name in names else "", description="embedding")
            self.choice.add_class("sdkit-embedding")
            self.hint = w.HTML()
            self.choice.observe(lambda _change: self._hint(), names="value")
            self._hint()
            self.widgets = [self.choice, self.hint]

        def _hint(self) -> None:
            chosen = self.choice.value
            self.hint.value = (f"write <b>{chosen}</b> in the prompt to use it" if chosen
                               else "no embedding: every word is read by the text encoder as it was trained")

        def prepare(self, pipe, settings) -> None:
            """Use the chosen file's word; remove every other embedding of the folder from the pipeline."""
            others = [n for n in names if n != self.choice.value]
            if others:
                remove(pipe, *others)
            if self.choice.value:
                restore(pipe, self.choice.value)

    return EmbeddingGroup()
