from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdkit import checkpoints, prompts
from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings, generate

# A1111's own documented examples (modules/prompt_parser.py, parse_prompt_attention's docstring).
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text, expected", A1111_EXAMPLES)
def test_a1111s_documented_examples(text, expected):
    assert prompts.parse(text) == expected


def test_square_brackets_break_and_weights_with_spaces():
    assert prompts.parse("[faint]") == [("faint", 1 / 1.1)]
    assert prompts.parse("(red : 1.3)") == [("red ", 1.3)]  # the space before the colon stays text
    assert prompts.parse("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert prompts.parse("") == [("", 1.0)]
    assert prompts.plain("a (red:1.3) [circle] BREAK on \\(white\\)") == "a red circle on (white)"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab ()[]:\\1.3BREAK,", max_size=40))
def test_parse_never_fails_and_keeps_every_letter(text):
    try:
        parsed = prompts.parse(text)
    except SdkitError as error:  # only a weight that is not a number, like (a:1.3.3), is refused
        assert "prompt weight" in error.message
        return
    assert all(isinstance(part, str) and isinstance(weight, float) for part, weight in parsed)
    letters = "".join(part for part, weight in parsed if weight != -1.0)
    assert sorted(c for c in letters if c in "ab") == sorted(c for c in text if c in "ab") or "BREAK" in text


@pytest.fixture(scope="module")
def sd1(tiny_files):
    return checkpoints.load(tiny_files["sd1"])


def test_chunks_are_77_tokens_and_long_prompts_are_split_not_cut(sd1):
    words = ", ".join(f"red circle {i}" for i in range(30))  # about 120 tokens
    packed, count = prompts.chunks(sd1.tokenizer, words)
    assert count > 75 and len(packed) == 2
    for chunk in packed:
        assert len(chunk.tokens) == len(chunk.weights) == 77
        assert chunk.tokens[0] == sd1.tokenizer.bos_token_id and chunk.tokens[-1] == sd1.tokenizer.eos_token_id
    comma = sd1.tokenizer.get_vocab()[",</w>"]
    first = packed[0].tokens[1:-1]
    end = sd1.tokenizer.eos_token_id
    body = first[: first.index(end)] if end in first else first
    assert body[-1] == comma, "the first chunk ends after a comma, as A1111's comma backtrack does"
    assert sum(len([t for t in c.tokens[1:-1] if t != end]) for c in packed) == count


def test_break_starts_a_new_chunk(sd1):
    packed, _ = prompts.chunks(sd1.tokenizer, "a red circle BREAK a white background")
    assert len(packed) == 2


def test_a_plain_prompt_encodes_exactly_as_diffusers_does(sd1):
    args, notes = prompts.encode(sd1, "a red circle", "blurry")
    theirs, their_negative = sd1.encode_prompt("a red circle", "cpu", 1, True, "blurry")
    assert torch.equal(args["prompt_embeds"], theirs) and torch.equal(args["negative_prompt_embeds"], their_negative)
    assert notes == []


def test_sdxl_plain_prompts_match_diffusers_and_carry_the_pooled_output(tiny_files):
    xl = checkpoints.load(tiny_files["sdxl"])
    args, _ = prompts.encode(xl, "a red circle", "blurry")
    embeds, negative, pooled, negative_pooled = xl.encode_prompt("a red circle", device="cpu", negative_prompt="blurry")
    assert torch.equal(args["prompt_embeds"], embeds) and torch.equal(args["negative_prompt_embeds"], negative)
    assert torch.equal(args["pooled_prompt_embeds"], pooled)
    assert torch.equal(args["negative_pooled_prompt_embeds"], negative_pooled)


def test_sd2_pads_after_the_end_token_with_its_pad_token(tiny_files):
    sd2 = checkpoints.load(tiny_files["sd2"])
    args, _ = prompts.encode(sd2, "a red circle", "")
    theirs, _ = sd2.encode_prompt("a red circle", "cpu", 1, True, "")
    assert torch.equal(args["prompt_embeds"], theirs)


def test_weights_scale_their_tokens_against_the_others(sd1):
    plain = prompts.encode(sd1, "a red circle", "")[0]["prompt_embeds"].float()
    assert torch.equal(prompts.encode(sd1, "a (red:1.0) circle", "")[0]["prompt_embeds"].float(), plain)
    heavy = prompts.encode(sd1, "a (red:1.5) circle", "")[0]["prompt_embeds"].float()
    ratio = heavy[0].norm(dim=-1) / plain[0].norm(dim=-1)  # tokens: start, a, red, circle, end...
    assert ratio[2] / ratio[1] == pytest.approx(1.5, rel=0.02)
    assert ratio[3] / ratio[1] == pytest.approx(1.0, rel=0.02)


def test_emphasis_keeps_the_chunk_mean_as_a1111_does():
    hidden = torch.rand(1, 5, 8) + 0.5
    weighted = prompts._weighted(hidden, [1.0, 1.5, 1.0, 0.5, 1.0])
    assert weighted.mean().item() == pytest.approx(hidden.mean().item(), rel=1e-5)
    assert (weighted[0, 1] / hidden[0, 1]).mean() / (weighted[0, 0] / hidden[0, 0]).mean() == pytest.approx(1.5)


def test_a_long_prompt_pads_the_negative_and_its_second_chunk_changes_the_picture(sd1):
    head = ", ".join(["a red circle"] * 19)  # 75 tokens or a little more: the first chunk
    long_a, long_b = head + ", on a white background", head + ", on a black background"
    args, notes = prompts.encode(sd1, long_a, "blurry")
    assert args["prompt_embeds"].shape == args["negative_prompt_embeds"].shape == (1, 154, 32)
    assert notes and "2 chunks" in notes[0]
    fast = GenerationSettings(seed=1, steps=3, width=32, height=32)
    a = generate(sd1, fast.replace(prompt=long_a), progress=False)[0]
    b = generate(sd1, fast.replace(prompt=long_b), progress=False)[0]
    assert not np.array_equal(np.asarray(a), np.asarray(b)), "words after token 75 are read, not cut off"
    assert a.sdkit_settings.prompt == long_a and any("chunks" in n for n in a.sdkit_notes)
