# md
# 01 · The computer is dumb: say exactly what you want

Ask a person for "a sheep" and they ask back: a photo? a cartoon? Ghibli style? An image model never asks.
It draws *something*, and everything you did not say is decided by chance. This notebook shows the knobs
that decide an image: the **prompt**, the **seed**, the number of **steps**, **CFG** (how strictly the prompt is
followed) and the **sampler**.

> **Model used here.** Until the course's own *shapes world* model is trained and bundled, this notebook runs
> on a *tiny random* Stable Diffusion 1.x checkpoint that sdkit writes in the real civitai file layout. Its
> pictures are noise, not shapes, but every call below is the one you use with a real checkpoint: only the
> file name changes.
#%%
# Setup
import tempfile
from pathlib import Path

import numpy as np

import sdkit
from sdkit import checkpoints, plots
from sdkit.generate import GenerationSettings, generate, sampler_names
from sdkit.testing import write_tiny
#%%
# Parameters
PROMPT_VAGUE = "a shape"
PROMPT_EXACT = "a red circle on a white background"
SEED = 1
STEPS = 8
CFG = 7.0
SIZE = 64
#%%
# md
## 1. Load a checkpoint

`checkpoints.load(name_or_path)` reads a single `.safetensors` file (the kind civitai serves), works out its
family from the tensor names, and builds the diffusers pipeline with the configs shipped in sdkit: no internet.
#%%
models = Path(tempfile.mkdtemp()) / "checkpoints"
write_tiny("sd1", models / "tiny-random-sd1.safetensors")
pipe = checkpoints.load(models / "tiny-random-sd1.safetensors")
print(pipe.sdkit)
#%%
# md
## 2. Vague vs exact prompts, across seeds

The **seed** picks the starting noise. With the same seed and settings you get the same picture, pixel for
pixel; another seed gives another picture. Each row below is one prompt, each column one seed.
#%%
base = GenerationSettings(prompt=PROMPT_VAGUE, seed=SEED, steps=STEPS, cfg=CFG, width=SIZE, height=SIZE)
rows = {p: generate(pipe, base.replace(prompt=p, batch_size=4), progress=False) for p in (PROMPT_VAGUE, PROMPT_EXACT)}
images = [im for batch in rows.values() for im in batch]
labels = [f"{p[:18]}… seed {im.sdkit_settings.seed}" for p, batch in rows.items() for im in batch]
plots.grid(images, labels=labels, cols=4)
#%%
again = generate(pipe, base.replace(prompt=PROMPT_EXACT), progress=False)[0]
same = np.array_equal(np.asarray(again), np.asarray(rows[PROMPT_EXACT][0]))
print(f"same prompt, same seed, generated again: identical pixels = {same}")
#%%
# md
## 3. Steps, CFG and sampler

* **Steps**: how many times the model removes a bit of noise. More steps, more detail, more time.
* **CFG**: how hard the prompt pushes. 1 ignores the negative prompt; 7 is the usual; very high burns the colours.
* **Sampler**: the numerical method that walks from noise to picture (`euler`, `euler_a`, `dpmpp_2m`, ...).

We measure how far each picture is from the 20-step picture of the same seed (mean absolute pixel difference):
#%%
reference = np.asarray(generate(pipe, base.replace(prompt=PROMPT_EXACT, steps=20), progress=False)[0], dtype=float)
step_counts = [1, 2, 4, 8, 12]
distance = [np.abs(np.asarray(generate(pipe, base.replace(prompt=PROMPT_EXACT, steps=n), progress=False)[0],
                              dtype=float) - reference).mean() for n in step_counts]
plots.sweep(step_counts, {"distance to the 20-step image": distance}, xlabel="steps", ylabel="mean |pixel difference|")
#%%
cfgs = [1.0, 4.0, 7.0, 12.0]
by_cfg = [generate(pipe, base.replace(prompt=PROMPT_EXACT, cfg=c), progress=False)[0] for c in cfgs]
plots.grid(by_cfg, labels=[f"CFG {c}" for c in cfgs], cols=4)
#%%
samplers = ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc"]
by_sampler = [generate(pipe, base.replace(prompt=PROMPT_EXACT, sampler=s), progress=False)[0] for s in samplers]
plots.grid(by_sampler, labels=samplers, cols=3)
print("all samplers sdkit knows:", ", ".join(sampler_names()))
#%%
# md
## What to take away

* The model does exactly what the numbers say: same prompt + seed + settings = same picture.
* Everything the prompt leaves open is decided by the seed: say what you want.
* Next: `02_checkpoints`, the painter itself.
