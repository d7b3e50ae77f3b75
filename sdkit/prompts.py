"""A1111's prompt language: (word), (word:1.3), [word], \\( escapes, BREAK, and prompts longer than 75 tokens.

    prompts.parse("a (red:1.3) circle")    # [("a ", 1.0), ("red", 1.3), (" circle", 1.0)]
    prompts.encode(pipe, "a (red:1.3) circle", "blurry", clip_skip=1)   # the pipeline's prompt_embeds arguments

Written here because no kept library reads this syntax the way A1111 does: compel has its own syntax (`word++`,
`(word)1.3`) and weights differently, and diffusers has none. The behaviour follows A1111's
modules/prompt_parser.py and sd_hijack_clip.py: fragments weighted by brackets, tokens packed into chunks of 75
(breaking after a comma within the last 20 tokens, and at BREAK), each chunk encoded on its own as
[start] + 75 + [end], weighted by scaling each token's output and restoring the chunk's mean ("Original" emphasis),
and the chunks joined. The negative prompt is padded with empty chunks to the same length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

CHUNK = 75  # tokens per chunk, between the start and end tokens
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack: a chunk ends after a comma this close to its end
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = ("BREAK", -1.0)
MAX_WEIGHT = 10.0  # an explicit weight beyond this is a typo (1.5 -> 15): it only paints noise

# One alternative per kind of piece: escapes, brackets, a ":weight)" ending, plain text, a lone colon.
_PIECES = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse(text: str) -> list[tuple[str, float]]:
    """A1111's attention parser: (text, weight) fragments, BREAK as ("BREAK", -1); unclosed brackets still count."""
    out: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for match in _PIECES.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            out.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(out))
        elif piece == "[":
            square_open.append(len(out))
        elif weight is not None and round_open:
            multiply(round_open.pop(), _weight(weight, text))
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    out.append(list(BREAK))
                out.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    merged: list[list] = []
    for item in out or [["", 1.0]]:
        if merged and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(text_, float(weight)) for text_, weight in merged]


def _weight(written: str, text: str) -> float:
    """An explicit `(word:WEIGHT)` as a number, or a clear error (A1111 itself fails on `(word:1.2.3)`)."""
    from sdkit.errors import SdkitError

    try:
        weight = float(written)
    except ValueError:
        raise SdkitError(f"the prompt weight {written!r} in {text[:60]!r} is not a number.",
                         fix="write it like (word:1.2)") from None
    if not -MAX_WEIGHT <= weight <= MAX_WEIGHT:
        raise SdkitError(f"the prompt weight {written} is far outside what models respond to (-{MAX_WEIGHT:g} to "
                         f"{MAX_WEIGHT:g}; 0.5 to 1.5 is usual).", fix="write it like (word:1.2)")
    return weight


def plain(text: str) -> str:
    """The prompt's words without the weighting syntax (what the text encoder reads)."""
    return "".join(" " if weight == BREAK[1] else part for part, weight in parse(text))


@dataclass
class Chunk:
    """77 token ids ([start] + 75 + [end], padded) and one weight per token."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunks(tokenizer, text: str, *, expand=lambda s: s) -> tuple[list[Chunk], int]:
    """The prompt as A1111 packs it into chunks, and how many prompt tokens it has; `expand` maps each fragment's
    text before tokenizing (embedding words to their tokens)."""
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    done: list[Chunk] = []
    current = Chunk()
    last_comma = -1
    count = 0

    def close() -> None:
        nonlocal current, last_comma
        pad = CHUNK - len(current.tokens)
        current.tokens = [start] + current.tokens + [end] * (pad + 1)
        current.weights = [1.0] + current.weights + [1.0] * (pad + 1)
        done.append(current)
        current, last_comma = Chunk(), -1

    for part, weight in parse(text):
        if (part, weight) == BREAK:
            close()
            continue
        for token in tokenizer(expand(part), add_special_tokens=False, truncation=False).input_ids if part else []:
            count += 1
            if token == comma:
                last_comma = len(current.tokens)
            elif len(current.tokens) == CHUNK and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1  # move the words after the comma into the next chunk
                moved = Chunk(current.tokens[cut:], current.weights[cut:])
                current.tokens, current.weights = current.tokens[:cut], current.weights[:cut]
                close()
                current = moved
            if len(current.tokens) == CHUNK:
                close()
            current.tokens.append(token)
            current.weights.append(weight)
    if current.tokens or not done:
        close()
    return done, count


def _hidden(encoder, ids: torch.Tensor, *, layer: int | None, final_norm: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One encoder's per-token output (the last layer, or hidden_states[layer]) and its pooled output if it has one."""
    out = encoder(ids, output_hidden_states=layer is not None)
    if layer is None:
        hidden = out.last_hidden_state
    else:
        hidden = out.hidden_states[layer]
        if final_norm:
            hidden = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
    return hidden, getattr(out, "text_embeds", None)


def _encoders(pipe, clip_skip: int) -> list[tuple[object, object, int | None, bool]]:
    """(tokenizer, encoder, hidden layer, final norm) per text encoder, with A1111's clip skip.

    SD1/SD2 read the last layer (clip skip 1) or an earlier one through the final norm; SDXL reads the penultimate
    layer of both encoders without it, one more layer back per clip-skip step (as diffusers' clip_skip does)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        layer = -(clip_skip + 1)
        return [(pipe.tokenizer, pipe.text_encoder, layer, False), (pipe.tokenizer_2, pipe.text_encoder_2, layer, False)]
    return [(pipe.tokenizer, pipe.text_encoder, None if clip_skip == 1 else -clip_skip, True)]


def _weighted(hidden: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """A1111's "Original" emphasis: scale each token's vector by its weight, then restore the chunk's mean."""
    if all(w == 1.0 for w in weights):
        return hidden
    exact = hidden.float()  # in fp32: a bf16 mean of values around 0 is mostly rounding
    original = exact.mean()
    scaled = exact * torch.tensor(weights, device=hidden.device)[None, :, None]
    return (scaled * (original / scaled.mean())).to(hidden.dtype)


def _encode_one(pipe, text: str, *, clip_skip: int) -> tuple[list[torch.Tensor], torch.Tensor | None, int]:
    """Per-chunk conditioning (encoders joined on the feature axis), the pooled output of the first chunk
    (SDXL), and the prompt's token count."""
    from sdkit.embeddings import expand

    per_chunk: list[list[torch.Tensor]] = []
    pooled = None
    count = 0
    for tokenizer, encoder, layer, final_norm in _encoders(pipe, clip_skip):
        packed, count = chunks(tokenizer, text, expand=lambda s: expand(pipe, s))
        for i, chunk in enumerate(packed):
            ids = list(chunk.tokens)
            if tokenizer.pad_token_id != tokenizer.eos_token_id:  # SD2's tokenizer pads with "!" after the end
                first_end = ids.index(tokenizer.eos_token_id, 1)
                ids[first_end + 1:] = [tokenizer.pad_token_id] * (len(ids) - first_end - 1)
            hidden, pool = _hidden(encoder, torch.tensor([ids], device=encoder.device), layer=layer,
                                   final_norm=final_norm)
            if i == 0 and pool is not None:
                pooled = pool
            if len(per_chunk) <= i:
                per_chunk.append([])
            per_chunk[i].append(_weighted(hidden, chunk.weights))
    return [torch.cat(parts, dim=-1) for parts in per_chunk], pooled, count


def _weights_version(model) -> tuple[int, int]:
    """Changes whenever a weight of `model` is replaced or changed in place (a LoRA or embedding applied)."""
    params = list(model.parameters())
    return (sum(id(p) for p in params), sum(p._version for p in params))


CACHE_SIZE = 32


def _cached(pipe, text: str, *, clip_skip: int):
    """_encode_one, cached per prompt: moving a slider that is not the prompt does not run the text encoder again."""
    from collections import OrderedDict

    cache = pipe.__dict__.setdefault("_sdkit_prompt_cache", OrderedDict())
    encoders = [e for _, e, _, _ in _encoders(pipe, clip_skip)]
    from sdkit.embeddings import loaded

    key = (text, clip_skip, tuple(_weights_version(e) for e in encoders), tuple(loaded(pipe)))  # words in use count
    if key not in cache:
        with torch.inference_mode():
            cache[key] = _encode_one(pipe, text, clip_skip=clip_skip)
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return cache[key]


def encode(pipe, prompt: str, negative: str, *, clip_skip: int = 1) -> tuple[dict, list[str]]:
    """The diffusers pipeline arguments for both prompts (same length, as A1111 pads them), and notes for the learner."""
    positive, pooled, count = _cached(pipe, prompt, clip_skip=clip_skip)
    negative_chunks, negative_pooled, negative_count = _cached(pipe, negative, clip_skip=clip_skip)
    counts = {"positive": (count, len(positive)), "negative": (negative_count, len(negative_chunks))}
    longest = max(len(positive), len(negative_chunks))
    if len(positive) != len(negative_chunks):
        empty = _cached(pipe, "", clip_skip=clip_skip)[0][0]
        positive = positive + [empty] * (longest - len(positive))
        negative_chunks = negative_chunks + [empty] * (longest - len(negative_chunks))
    args = {"prompt_embeds": torch.cat(positive, dim=1), "negative_prompt_embeds": torch.cat(negative_chunks, dim=1)}
    if pooled is not None:
        args |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
    notes = [f"The {which} prompt is {n} tokens: it was encoded in {k} chunks of up to {CHUNK}, as A1111 does."
             for which, (n, k) in counts.items() if n > CHUNK]
    return args, notes
