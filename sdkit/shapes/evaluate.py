"""Measure how well a checkpoint follows shapes-world prompts, with the classical detector as the judge."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict

from tqdm.auto import tqdm

from sdkit.generate import GenerationSettings, generate
from sdkit.shapes import data
from sdkit.shapes.detect import detect

ATTRIBUTES = ("colour", "shape", "background")
CHOICES = {"colour": list(data.COLOURS), "shape": list(data.SHAPES), "background": list(data.BACKGROUNDS)}
CHANCE = {name: 1 / len(values) for name, values in CHOICES.items()}
VAGUE_PROMPTS = ("", "a shape", "a red shape", "a circle", "a shape on a black background")
DEFAULTS = GenerationSettings(width=64, height=64, steps=20, cfg=7.0, sampler="euler_a")


def _entropy(counts: Counter, *, of: int) -> float:
    """Entropy of the seen values as a fraction of the maximum (1.0 = every value equally often)."""
    total = sum(counts.values())
    h = -sum(c / total * math.log(c / total) for c in counts.values() if c)
    return h / math.log(of)


def _judge(images: list) -> list[dict[str, str]]:
    """What the detector sees in each image."""
    return [{k: getattr(d, k) for k in ATTRIBUTES} for d in map(detect, images)]


def evaluate(pipe, *, seeds: int = 4, vague_seeds: int = 16, settings: GenerationSettings = DEFAULTS,
             prompts: list[str] | None = None, progress: bool = True) -> dict:
    """Generate every full caption x `seeds` (seeds 0..seeds-1), detect, and report accuracy, confusion and speed."""
    prompts = (prompts or data.full_captions()) if seeds else []
    correct = {k: 0 for k in ATTRIBUTES}
    confusion = {k: {want: Counter() for want in CHOICES[k]} for k in ATTRIBUTES}
    all_right, seconds, n = 0, 0.0, 0
    for prompt in tqdm(prompts, desc="full prompts", disable=not progress):
        wanted = data.parse_caption(prompt)
        start = time.perf_counter()
        images = generate(pipe, settings.replace(prompt=prompt, seed=0, batch_size=seeds), progress=False)
        seconds += time.perf_counter() - start
        for seen in _judge(images):
            n += 1
            hits = [seen[k] == wanted[k] for k in ATTRIBUTES]
            all_right += all(hits)
            for k, hit in zip(ATTRIBUTES, hits):
                correct[k] += hit
                confusion[k][wanted[k]][seen[k]] += 1
    vague = []
    for prompt in tqdm(VAGUE_PROMPTS, desc="vague prompts", disable=not progress) if vague_seeds else ():
        wanted = data.parse_caption(prompt)
        images = generate(pipe, settings.replace(prompt=prompt, seed=0, batch_size=vague_seeds), progress=False)
        seen = _judge(images)
        row: dict = {"prompt": prompt, "images": len(seen)}
        for k in ATTRIBUTES:
            counts = Counter(s[k] for s in seen)
            if wanted[k]:
                row[k] = {"asked": wanted[k], "accuracy": counts[wanted[k]] / len(seen), "chance": CHANCE[k]}
            else:
                row[k] = {"asked": None, "seen": dict(counts), "spread": round(_entropy(counts, of=len(CHOICES[k])), 3)}
        vague.append(row)
    return {
        "model": getattr(getattr(pipe, "sdkit", None), "name", ""),
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("prompt", "negative_prompt", "extra")},
        "images": n,
        "accuracy": {k: correct[k] / max(n, 1) for k in ATTRIBUTES} | {"all": all_right / max(n, 1)},
        "chance": CHANCE | {"all": math.prod(CHANCE.values())},
        "confusion": {k: {want: dict(c) for want, c in rows.items()} for k, rows in confusion.items()},
        "seconds_per_image": seconds / max(n, 1),
        "vague": vague,
    }


def format_report(result: dict) -> str:
    """The evaluation as a short text table."""
    acc, chance = result["accuracy"], result["chance"]
    lines = [f"{result['model']}: {result['images']} images, {result['seconds_per_image']:.3f} s per image "
             f"({result['settings']['steps']} steps, CFG {result['settings']['cfg']}, {result['settings']['sampler']})",
             "attribute   accuracy  chance"]
    lines += [f"{k:<11} {acc[k]:>7.1%}  {chance[k]:>6.1%}" for k in (*ATTRIBUTES, "all")]
    for k in ("shape", "colour"):
        lines.append(f"{k} confusion (asked -> seen): " + "; ".join(
            f"{want}: " + ", ".join(f"{seen} {c}" for seen, c in sorted(row.items(), key=lambda x: -x[1]))
            for want, row in result["confusion"][k].items()))
    for row in result["vague"]:
        parts = []
        for k in ATTRIBUTES:
            cell = row[k]
            parts.append(f"{k} {cell['accuracy']:.0%} (chance {cell['chance']:.0%})" if cell["asked"]
                         else f"{k} spread {cell['spread']:.2f}")
        lines.append(f"vague {row['prompt']!r:<34} " + ", ".join(parts))
    return "\n".join(lines)


# --- the add-on lessons: how often a LoRA's style or an embedding's word shows ------------------------------------

ADDON_SAMPLES = 16


def addon_prompts(samples: int = ADDON_SAMPLES) -> list[str]:
    """`samples` full captions spread over every shape, colour and background."""
    captions = data.full_captions()
    return [captions[(i * 5) % len(captions)] for i in range(samples)]  # 5 is coprime to 24: no repeats up to 24


def _shares(pipe, prompts: list[str], *, settings: GenerationSettings, judge) -> float:
    """The share of images (prompt i with seed i) for which judge(detection) holds."""
    hits = 0
    for seed, prompt in enumerate(prompts):
        image = generate(pipe, settings.replace(prompt=prompt, seed=seed, batch_size=1), progress=False)[0]
        hits += bool(judge(image))
    return hits / len(prompts)


def style_share(pipe, lora, *, weights: tuple[float, ...] = (-1, 0, 1, 2), style: str = "outline",
                samples: int = ADDON_SAMPLES, settings: GenerationSettings = DEFAULTS,
                progress: bool = True) -> dict[float, float]:
    """For each LoRA weight, the share of `samples` seeded images whose shape the detector sees drawn in `style`."""
    from sdkit import loras

    prompts = addon_prompts(samples)
    shares = {}
    try:
        for weight in tqdm(weights, desc=f"{lora.name} weights", disable=not progress):
            loras.apply(pipe, [(lora, weight)])
            shares[weight] = _shares(pipe, prompts, settings=settings, judge=lambda im: detect(im).style == style)
    finally:
        loras.remove(pipe)
    return shares


def word_share(pipe, word: str, *, look: dict[str, str], prompts: tuple[str, ...] | None = None,
               samples: int = ADDON_SAMPLES, settings: GenerationSettings = DEFAULTS,
               progress: bool = True) -> dict[str, float]:
    """The share of `samples` seeded pictures of the word's prompts (in turn) showing `look` (colour, shape and
    background), with the embedding file for the word and without it (the word read as plain text); the embedding
    is left in use afterwards."""
    from sdkit import embeddings

    chosen = prompts or (f"a {word}",)
    asked = [chosen[i % len(chosen)] for i in range(samples)]
    judge = lambda im: all(getattr(detect(im), k) == v for k, v in look.items())  # noqa: E731
    shares = {}
    for used in tqdm((False, True), desc=f"{word} without/with", disable=not progress):
        if used:
            embeddings.restore(pipe, word)
        else:
            embeddings.remove(pipe, word)
        shares["with" if used else "without"] = _shares(pipe, asked, settings=settings, judge=judge)
    return shares
