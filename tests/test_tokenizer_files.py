"""Checks of the CLIP tokenizer files shipped in sdkit/configs/tokenizers/.

The files are derived by tools/make_clip_tokenizer.py from OpenAI's CLIP BPE merge
list (see sdkit/configs/tokenizers/README.md). These tests need no network and no
open_clip: they check the files' bytes, re-derive vocab.json from merges.txt, compare
transformers' CLIPTokenizer against ids known from Hugging Face's
openai/clip-vit-large-patch14 tokenizer and against a re-implementation of OpenAI's
simple_tokenizer, and check both padding variants.

Set SDKIT_CLIP_BPE_SOURCE to an open_clip_torch wheel (or to its
bpe_simple_vocab_16e6.txt.gz) to also regenerate every file from the source and compare.
"""

import functools
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = ROOT / "sdkit" / "configs" / "tokenizers"
BPE_DIR = TOKENIZERS / "clip_bpe"
VOCAB = BPE_DIR / "vocab.json"
MERGES = BPE_DIR / "merges.txt"

VOCAB_SHA256 = "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69"
MERGES_SHA256 = "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"
VOCAB_SIZE_BYTES = 961143  # size of HF openai/clip-vit-large-patch14 vocab.json
MERGES_SIZE_BYTES = 524619  # size of HF openai/clip-vit-large-patch14 merges.txt

BOS_ID, EOS_ID = 49406, 49407

# ids produced by Hugging Face's openai/clip-vit-large-patch14 tokenizer
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photograph of an astronaut riding a horse": [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407],
    "hello world": [49406, 3306, 1002, 49407],
}

# (variant folder, pad token, pad id)
VARIANTS = [("clip_l", "<|endoftext|>", EOS_ID), ("open_clip", "!", 0)]


def _load_tool():
    path = ROOT / "tools" / "make_clip_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=None)
def _vocab():
    with open(VOCAB, encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def _merge_lines():
    text = MERGES.read_bytes().decode("utf-8")
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    assert lines[0] == "#version: 0.2"
    return lines[1:]


# --- the files themselves -------------------------------------------------------------


def test_layout():
    assert VOCAB.is_file() and MERGES.is_file()
    assert (TOKENIZERS / "README.md").is_file()
    for name, _, _ in VARIANTS:
        files = sorted(p.name for p in (TOKENIZERS / name).iterdir())
        # the variant folders hold only the small JSON files; the BPE data lives once in clip_bpe/
        assert files == ["special_tokens_map.json", "tokenizer_config.json"]


def test_bpe_files_bytes():
    # also guards against line-ending conversion or re-serialisation by an editor or git
    assert VOCAB.stat().st_size == VOCAB_SIZE_BYTES
    assert MERGES.stat().st_size == MERGES_SIZE_BYTES
    assert _sha256(VOCAB) == VOCAB_SHA256
    assert _sha256(MERGES) == MERGES_SHA256
    assert b"\r" not in MERGES.read_bytes()


def test_merges_structure():
    merges = _merge_lines()
    assert len(merges) == 49152 - 256 - 2  # OpenAI: merges[1:49152-256-2+1]
    assert merges[:4] == ["i n", "t h", "a n", "r e"]
    assert merges[-1] == "jeky ll</w>"
    assert all(len(m.split(" ")) == 2 for m in merges)
    assert len(set(merges)) == len(merges)


def test_vocab_contents():
    vocab = _vocab()
    assert len(vocab) == 49408
    # key order is id order, ids are 0..49407
    assert list(vocab.values()) == list(range(49408))
    assert vocab["!"] == 0
    assert vocab["!</w>"] == 256
    assert vocab["a</w>"] == 320
    assert vocab["<|startoftext|>"] == BOS_ID
    assert vocab["<|endoftext|>"] == EOS_ID


def test_vocab_is_rederived_from_merges():
    # vocab.json is a function of merges.txt: OpenAI's construction, HF's serialisation
    encoder = tool.derive_vocab(_merge_lines())
    assert tool.vocab_bytes(encoder) == VOCAB.read_bytes()
    assert tool.merges_bytes(_merge_lines()) == MERGES.read_bytes()
    assert tool.bytes_to_unicode()[ord("!")] == "!"


def test_variant_json_files():
    for name, pad, _ in VARIANTS:
        folder = TOKENIZERS / name
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        special = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))
        assert config["tokenizer_class"] == "CLIPTokenizer"
        assert config["model_max_length"] == 77
        assert config["do_lower_case"] is True
        for cfg in (config, special):
            assert cfg["bos_token"] == "<|startoftext|>"
            assert cfg["eos_token"] == "<|endoftext|>"
            assert cfg["unk_token"] == "<|endoftext|>"
            assert cfg["pad_token"] == pad
        # the generator writes exactly these files
        generated = tool.build_files("#version: 0.2\na b")
        for fname in ("tokenizer_config.json", "special_tokens_map.json"):
            assert generated[f"{name}/{fname}"] == (folder / fname).read_bytes()


# --- transformers ---------------------------------------------------------------------

import transformers  # noqa: E402


@functools.lru_cache(maxsize=None)
def _tokenizer(variant):
    return transformers.CLIPTokenizer.from_pretrained(
        str(TOKENIZERS / variant), vocab_file=str(VOCAB), merges_file=str(MERGES)
    )


def _check_known_ids(tok):
    assert len(tok) == 49408
    assert tok.bos_token_id == BOS_ID
    assert tok.eos_token_id == EOS_ID
    for text, ids in KNOWN_IDS.items():
        assert tok(text).input_ids == ids, text
    assert tok.convert_tokens_to_ids(["!", "!</w>", "a</w>", "<|startoftext|>", "<|endoftext|>"]) == [
        0,
        256,
        320,
        BOS_ID,
        EOS_ID,
    ]
    # lower-casing and whitespace collapsing
    assert tok("A  Photo\nof a CAT").input_ids == KNOWN_IDS["a photo of a cat"]


def test_clip_tokenizer_from_vocab_and_merges_paths():
    tok = transformers.CLIPTokenizer(vocab=str(VOCAB), merges=str(MERGES))
    _check_known_ids(tok)
    assert tok.pad_token_id == EOS_ID  # CLIPTokenizer's default pad token


def test_clip_tokenizer_from_loaded_vocab_and_merges():
    merges = [tuple(m.split(" ")) for m in _merge_lines()]
    tok = transformers.CLIPTokenizer(vocab=dict(_vocab()), merges=merges)
    _check_known_ids(tok)


def test_clip_tokenizer_fast():
    fast = transformers.CLIPTokenizerFast
    if fast is transformers.CLIPTokenizer:
        # transformers 5.x: one tokenizers-backed class; check it is what we use above
        assert _tokenizer("clip_l").is_fast
        return
    _check_known_ids(fast(vocab_file=str(VOCAB), merges_file=str(MERGES)))


@pytest.mark.parametrize("variant,pad_token,pad_id", VARIANTS)
def test_variant_padding(variant, pad_token, pad_id):
    tok = _tokenizer(variant)
    _check_known_ids(tok)
    assert tok.model_max_length == 77
    assert tok.pad_token == pad_token
    assert tok.pad_token_id == pad_id

    enc = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length, truncation=True)
    ids = KNOWN_IDS["a photo of a cat"]
    assert enc.input_ids == ids + [pad_id] * (77 - len(ids))
    assert enc.attention_mask == [1] * len(ids) + [0] * (77 - len(ids))

    # long prompts are truncated to 77 and still end with <|endoftext|>
    long_ids = tok("cat " * 100, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long_ids) == 77
    assert long_ids[0] == BOS_ID and long_ids[-1] == EOS_ID
    assert long_ids[1:-1] == [2368] * 75


@pytest.mark.parametrize("variant,pad_token,pad_id", VARIANTS)
def test_variant_from_complete_folder(tmp_path, variant, pad_token, pad_id):
    # the variant JSON files are valid Hugging Face tokenizer configs: a folder with them
    # plus the BPE files loads with AutoTokenizer
    for src in (VOCAB, MERGES, *(TOKENIZERS / variant).iterdir()):
        shutil.copy(src, tmp_path / src.name)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.pad_token_id == pad_id
    assert tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == KNOWN_IDS["a photo of a cat"]


# --- against OpenAI's algorithm ---------------------------------------------------------


class _OpenAISimpleTokenizer:
    """OpenAI's clip/simple_tokenizer.py encode(), minus ftfy/html clean-up, on our merges.txt."""

    def __init__(self, regex):
        self.byte_encoder = tool.bytes_to_unicode()
        merges = [tuple(m.split(" ")) for m in _merge_lines()]
        self.encoder = _vocab()
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.regex = regex

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        if len(word) == 1:
            return token + "</w>"
        while True:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
        return " ".join(word)

    def encode(self, text):
        text = self.regex.sub(r"\s+", " ", text).strip().lower()
        ids = []
        for token in self.regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return ids


def test_matches_openai_simple_tokenizer():
    import regex

    ref = _OpenAISimpleTokenizer(regex)
    tok = _tokenizer("clip_l")
    texts = [
        *KNOWN_IDS,
        "A majestic lion jumping from a big stone at night, highly detailed, 8k, trending on artstation",
        "portrait of a woman, (masterpiece:1.2), [[blurry]], photo-realistic!!!",
        "it's a dog's life; we'll see what they've done, I'm sure you'd agree",
        "Ünïcödé café naïve façade — 東京の夜 😀🎨 über straße",
        "numbers 1234567890 3.14 -42 1,000,000",
        "symbols @#$%^&*()_+={}|\\:\"<>?/~`",
        "antidisestablishmentarianism supercalifragilisticexpialidocious",
    ]
    for text in texts:
        expected = ref.encode(text)
        assert tok(text, add_special_tokens=False).input_ids == expected, text
        assert tok(text).input_ids == [BOS_ID] + expected + [EOS_ID], text
