# %% [markdown]
# # 01 · The computer is dumb: say exactly what you want
#
# Ask a person for "a sheep" and they ask back: a photo? a cartoon? Ghibli style? An image model never asks.
# It draws *something*, and everything you did not say is decided by chance.
#
# This notebook uses the course's own model, **shapes-v1**: a tiny Stable Diffusion (same architecture, same
# file format as the checkpoints on civitai) that the project trained on a world of one coloured shape on a plain
# background. Because that world is simple, a classical detector can tell what each picture shows, so we can
# *measure* how well the picture follows the prompt instead of just looking.
#
# The knobs: the **prompt**, the **seed**, the number of **steps**, **CFG** and the **sampler**.

# %%
# Setup
import numpy as np

from sdkit import checkpoints, plots, widgets
from sdkit.compare import CompareGroup
from sdkit.generate import GenerationSettings, generate
from sdkit.shapes import data, detect
from sdkit.shapes.evaluate import evaluate

# %%
# Parameters
VAGUE = "a shape"
EXACT = "a red circle on a white background"
SEEDS = 8          # pictures per prompt
STEPS = 20
CFG = 7.0
SAMPLER = "euler_a"

# %%
pipe = checkpoints.load("shapes-v1")
print(pipe.sdkit)
base = GenerationSettings(steps=STEPS, cfg=CFG, sampler=SAMPLER, width=pipe.sdkit.width, height=pipe.sdkit.height)


def label(image) -> str:
    """What the detector sees."""
    d = detect(image)
    return f"{d.colour} {d.shape}\non {d.background}"

# %% [markdown]
# ## 1. Vague vs exact
#
# Same seeds, two prompts. "a shape" leaves colour, shape and background open, so the seed decides them. The exact
# prompt leaves nothing open. Under each picture: what the detector sees.

# %%
vague = generate(pipe, base.replace(prompt=VAGUE, batch_size=SEEDS), progress=False)
exact = generate(pipe, base.replace(prompt=EXACT, batch_size=SEEDS), progress=False)
plots.grid(vague + exact, labels=[label(im) for im in vague + exact], cols=SEEDS, size=1.3,
           title=f"top: '{VAGUE}'   bottom: '{EXACT}'")

# %%
wanted = data.parse_caption(EXACT)
hits = sum(all(getattr(detect(im), k) == v for k, v in wanted.items()) for im in exact)
kinds = {label(im) for im in vague}
print(f"exact prompt: {hits}/{SEEDS} pictures are exactly what was asked")
print(f"vague prompt: {len(kinds)} different pictures in {SEEDS} tries")

# %% [markdown]
# ## 2. The seed
#
# The seed picks the starting noise. The same prompt, seed and settings give the same picture, pixel for pixel,
# on the same machine: that is how you share a result. (Each PNG sdkit writes records its seed.)

# %%
again = generate(pipe, base.replace(prompt=EXACT, seed=exact[3].sdkit_settings.seed), progress=False)[0]
print("seed", exact[3].sdkit_settings.seed, "again -> identical pixels:",
      np.array_equal(np.asarray(again), np.asarray(exact[3])))

# %% [markdown]
# ## 3. CFG: how hard the prompt pushes
#
# **CFG** (classifier-free guidance) makes two predictions each step, one *with* the prompt and one *without*, and
# pushes the picture away from the second by the CFG factor. CFG 1 means "no extra push". Too much push overshoots:
# colours burn and shapes break, and with few steps that happens sooner. We measure it over 6 full prompts.

# %%
prompts = data.full_captions()[::4]
cfgs = [1.0, 2.0, 4.0, 7.0, 12.0, 20.0]
accuracy = {f"{n} steps": [evaluate(pipe, seeds=1, vague_seeds=0, settings=base.replace(steps=n, cfg=c),
                                    prompts=prompts, progress=False)["accuracy"]["all"] for c in cfgs]
            for n in (5, 10)}
plots.sweep(cfgs, accuracy, xlabel="CFG", ylabel="share of pictures exactly as asked",
            title=f"prompt following vs CFG ({len(prompts)} prompts)")

# %%
burnt = [generate(pipe, base.replace(prompt=EXACT, steps=5, cfg=c), progress=False)[0] for c in cfgs]
plots.grid(burnt, labels=[f"CFG {c:g}\n{label(im)}" for c, im in zip(cfgs, burnt)], cols=len(cfgs), size=1.3,
           title="5 steps: more CFG is not always better")

# %% [markdown]
# ## 4. Steps
#
# Each step removes some noise. Too few steps and the picture is still mush.

# %%
step_counts = [1, 2, 4, 8, 16]
by_steps = [evaluate(pipe, seeds=1, vague_seeds=0, settings=base.replace(steps=n), prompts=data.full_captions()[::2],
                     progress=False)["accuracy"] for n in step_counts]
plots.sweep(step_counts, {k: [a[k] for a in by_steps] for k in ("colour", "shape", "background", "all")},
            xlabel="steps", ylabel="accuracy", title="prompt following vs steps (12 prompts, CFG 7)")

# %%
pictures = [generate(pipe, base.replace(prompt=EXACT, steps=n), progress=False)[0] for n in step_counts]
plots.grid(pictures, labels=[f"{n} steps" for n in step_counts], cols=len(step_counts), size=1.3)

# %% [markdown]
# ## 5. Samplers
#
# A sampler is the numerical method that walks from noise to picture. Same model, same seed, different walks.

# %%
samplers = ["euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc", "lcm"]
pictures = [generate(pipe, base.replace(prompt=EXACT, sampler=s), progress=False)[0] for s in samplers]
plots.grid(pictures, labels=samplers, cols=len(samplers), size=1.3)

# %% [markdown]
# ## What to take away
#
# * The model does exactly what the numbers say: same prompt + seed + settings = same picture.
# * What the prompt leaves open, the seed decides. Say what you want.
# * CFG is a dial, not "more is better": too much push overshoots, and with few steps it overshoots sooner.
# * By chance alone a picture would have the asked colour 25% of the time, the shape 33%, the background 50%.
# * `python -m sdkit evaluate shapes` runs the full measurement (24 prompts x 4 seeds); the model card
#   `models/checkpoints/shapes-v1.md` has its numbers.

# %% [markdown]
# ## Now try it yourself
#
# The panel runs the same model. Type a prompt, move a slider: **auto-run** is on for this small model, so a new
# picture appears by itself about half a second after you let go. **Generate** runs it by hand and **Cancel** stops
# between two steps. **Live preview** shows the picture while it denoises. The shuffle button next to the seed picks
# a new one (seed -1 means a new random one each time; the seed used is shown). Every picture goes into the gallery
# with its settings: **Use** puts them back into the controls, **Save** writes a numbered PNG into `outputs/` that
# A1111, civitai and `python -m sdkit params` read back. Under *Compare side by side*, tick *compare* to get one
# picture per value.

# %%
panel = widgets.Panel("shapes-v1", groups=[CompareGroup()], settings=base.replace(prompt=EXACT, seed=1))
panel.generate(wait=True)
panel
