#!/usr/bin/env python3
"""Derive the CLIP BPE tokenizer files that sdkit ships, without any model hub.

The CLIP text encoders used by Stable Diffusion (SD1's CLIP ViT-L/14, SD2's and
SDXL's OpenCLIP ViT-H/14 and ViT-bigG/14) all use OpenAI's CLIP byte-level BPE
vocabulary. OpenAI distributes it as ``bpe_simple_vocab_16e6.txt.gz`` (a list
of merges); the ``open_clip_torch`` wheel on PyPI ships the same file as
``open_clip/bpe_simple_vocab_16e6.txt.gz``. Hugging Face's ``vocab.json`` and
``merges.txt`` (e.g. of ``openai/clip-vit-large-patch14``) are a plain
re-serialisation of it, which this script reproduces byte for byte.

Usage (standard library only; open_clip is *not* a dependency of sdkit)::

    pip download --no-deps open_clip_torch -d /tmp/oc
    python tools/make_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl
    # or: python tools/make_clip_tokenizer.py path/to/bpe_simple_vocab_16e6.txt.gz
    # add --check to compare with the files already in the tree instead of writing

It writes, under ``sdkit/configs/tokenizers/`` (or ``--out``):

* ``clip_bpe/merges.txt`` -- ``#version: 0.2`` then the merges
  ``bpe_data[1:49152-256-2+1]`` (as ``merges = merges[1:49152-256-2+1]`` in
  OpenAI's ``clip/simple_tokenizer.py``), one per line, ending with a newline;
* ``clip_bpe/vocab.json`` -- OpenAI's vocabulary construction (the 256 byte
  symbols, the same with ``</w>``, one token per merge, then
  ``<|startoftext|>`` and ``<|endoftext|>``; 49408 entries) as a one-line JSON
  object in id order, serialised like Hugging Face's file
  (``json.dumps(vocab, ensure_ascii=False)``, no trailing newline);
* ``clip_l/`` and ``open_clip/`` -- ``tokenizer_config.json`` and
  ``special_tokens_map.json`` for the two ways Stable Diffusion pipelines
  configure this tokenizer: ``clip_l`` (SD1.x, SDXL's first text encoder) pads
  with ``<|endoftext|>``, ``open_clip`` (SD2.x, SDXL's second text encoder)
  pads with ``!`` (id 0). Both share the BPE files in ``clip_bpe/``.
"""

import argparse
import gzip
import json
import os
import sys
import zipfile

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sdkit", "configs", "tokenizers")

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
VARIANTS = {
    # folder name -> pad token
    "clip_l": EOS,  # SD1.x text encoder, SDXL text_encoder (openai/clip-vit-large-patch14)
    "open_clip": "!",  # SD2.x text encoder, SDXL text_encoder_2 (OpenCLIP ViT-H / ViT-bigG)
}


def bytes_to_unicode():
    """OpenAI CLIP's (and GPT-2's) reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def read_bpe_text(source):
    """Return the decompressed text of bpe_simple_vocab_16e6.txt.gz, given that file or a wheel containing it."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            names = zf.namelist()
            if BPE_MEMBER not in names:  # another wheel that vendors the file elsewhere
                found = [n for n in names if n.endswith("/" + BPE_MEMBER.rsplit("/", 1)[1])]
                if not found:
                    raise SystemExit(f"{source}: no {BPE_MEMBER} in this archive")
                member = found[0]
            else:
                member = BPE_MEMBER
            data = zf.read(member)
    else:
        with open(source, "rb") as f:
            data = f.read()
    return gzip.decompress(data).decode("utf-8")


def derive_merges(bpe_text):
    """The merges exactly as OpenAI's simple_tokenizer selects them: lines [1, 49152-256-2+1)."""
    merges = bpe_text.split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    for m in merges:
        if len(m.split(" ")) != 2:
            raise ValueError(f"malformed merge line: {m!r}")
    return merges


def derive_vocab(merges):
    """OpenAI's vocabulary construction; returns token -> id (insertion order == id order)."""
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    for merge in merges:
        vocab.append("".join(merge.split(" ")))
    vocab.extend([BOS, EOS])
    encoder = dict(zip(vocab, range(len(vocab))))
    if len(encoder) != len(vocab):
        raise ValueError("duplicate tokens in the derived vocabulary")
    return encoder


def merges_bytes(merges):
    return ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8")


def vocab_bytes(encoder):
    return json.dumps(encoder, ensure_ascii=False).encode("utf-8")


def tokenizer_config(pad_token):
    return {
        "add_prefix_space": False,
        "bos_token": BOS,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }


def special_tokens_map(pad_token):
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}


def json_file_bytes(obj):
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def build_files(bpe_text):
    """Return {relative path: bytes} for every file this script produces."""
    merges = derive_merges(bpe_text)
    encoder = derive_vocab(merges)
    files = {
        "clip_bpe/merges.txt": merges_bytes(merges),
        "clip_bpe/vocab.json": vocab_bytes(encoder),
    }
    for name, pad in VARIANTS.items():
        files[f"{name}/tokenizer_config.json"] = json_file_bytes(tokenizer_config(pad))
        files[f"{name}/special_tokens_map.json"] = json_file_bytes(special_tokens_map(pad))
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="bpe_simple_vocab_16e6.txt.gz, or an open_clip_torch wheel containing it")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: sdkit/configs/tokenizers)")
    parser.add_argument("--check", action="store_true", help="compare with the existing files instead of writing")
    args = parser.parse_args(argv)

    files = build_files(read_bpe_text(args.source))
    mismatched = []
    for rel, data in files.items():
        path = os.path.join(args.out, *rel.split("/"))
        if args.check:
            try:
                with open(path, "rb") as f:
                    same = f.read() == data
            except FileNotFoundError:
                same = False
            if not same:
                mismatched.append(rel)
            print(f"{'ok' if same else 'DIFFERS'}  {rel}")
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            print(f"wrote {rel} ({len(data)} bytes)")
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
