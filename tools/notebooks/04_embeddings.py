# %% [markdown]
# # 04 · Embeddings: new words, and how the prompt is read
#
# The blog's `embeddings` folder holds tiny files that give the painter **a new word** for the look of something.
# They are also called *textual inversion*: instead of changing the painter, they find the numbers a word should
# have so that the unchanged painter draws the thing. The file name is the word: with `moon.safetensors` in the
# folder, writing *moon* in the prompt uses it (A1111's rule, and sdkit's).
#
# shapes-v1 learned a dozen words: four colours, three shapes, white and black, "on", "a", "background". The
# course's embedding **moon** teaches it a new one, for *a yellow circle on a black background*, without changing
# a single weight of the model. The second half of this notebook is about how the prompt reaches the model at all:
# A1111's `(word:1.3)` weights, `BREAK`, and long prompts.

# %%
# Setup
import tempfile
from pathlib import Path

import torch
from IPython.display import Markdown, display
from safetensors.torch import save_file

from sdkit import checkpoints, embeddings, plots, prompts, widgets
from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings, generate
from sdkit.shapes.addons import MOON, MOON_CAPTIONS
from sdkit.shapes.detect import detect
from sdkit.shapes.evaluate import ADDON_SAMPLES, word_share

# %%
# Parameters
MODEL = "shapes-v1"
WORD = "moon"                                     # an embedding file's name in models/embeddings
PROMPT = "a moon"
SEEDS = 6                                         # pictures per row

# %%
pipe = checkpoints.load(MODEL)
settings = GenerationSettings(prompt=PROMPT, steps=20, width=64, height=64)


def row(title: str) -> None:
    """SEEDS pictures of PROMPT (seeds 0, 1, ...), labelled with what the detector sees."""
    images = generate(pipe, settings.replace(seed=0, batch_size=SEEDS), progress=False)
    labels = [f"{d.colour} {d.shape}\non {d.background}" for d in map(detect, images)]
    display(plots.grid(images, labels=labels, cols=SEEDS, size=1.4, title=title))

# %% [markdown]
# ## 1. What is inside an embedding file
#
# A handful of numbers: one **vector** per token the word stands for, as wide as the text encoder's own word
# vectors (768 for SD1.5, 1024 for SD2, a 768 + 1280 pair for SDXL; 64 for the tiny shapes-v1).

# %%
moon = embeddings.load(WORD)
print(embeddings.describe(moon))
print(f"{moon.count} vectors x {moon.vectors['*'].shape[1]} numbers = {moon.vectors['*'].numel()} numbers in all")

# %% [markdown]
# ## 2. The word without the file, then with it
#
# Without the file, *moon* is just a word the text encoder never learned: like a vague prompt, the painter picks
# colour, shape and background by chance. With the file, the word stands for the two learned vectors, and the
# painter draws a yellow circle on black, wherever and however large the seed makes it.

# %%
embeddings.remove(pipe, WORD)     # what a learner without the file gets: the word read as plain text
row(f"'{PROMPT}' without {WORD}.safetensors")
embeddings.restore(pipe, WORD)    # the file is in the folder again: prompts that say the word use it
row(f"'{PROMPT}' with {WORD}.safetensors")

# %% [markdown]
# ## 3. Measured
#
# Sixteen pictures, one seed each, of the prompts the word was trained with (*a moon*, *the moon*, *moon*, *a moon
# at night*) in turn, with and without the file; the detector judges whether each shows a yellow circle on black.

# %%
shares = word_share(pipe, WORD, look=MOON, prompts=MOON_CAPTIONS)
print(", ".join(f"{k} the file: {v:.0%}" for k, v in shares.items()))
plots.bars({f"{k} the file": 100 * v for k, v in shares.items()}, unit="%",
           title=f"'{WORD}': yellow circles on black, of {ADDON_SAMPLES} pictures")

# %% [markdown]
# **What an embedding cannot do.** The first word the course tried to teach was *plum*, for purple, a colour
# shapes-v1 never painted. Trained the same way, it gave purple in 0 of 16 pictures: this model's VAE cannot even
# reproduce purple (it returns blue-violet), and its UNet paints only its four colours. An embedding finds a word
# for what the painter can already draw. A new colour or a new style needs the painter changed: a LoRA (notebook
# 03) or another checkpoint.

# %% [markdown]
# ## 4. An embedding for another model is refused
#
# The vectors must be exactly as wide as the text encoder's. An SD2 embedding (1024 wide) cannot go into an SD1
# model (768) or into shapes-v1 (64); sdkit refuses it and names both widths, and nothing changes.
# (`python -m sdkit info` and the panel show the same one line.)

# %%
folder = Path(tempfile.mkdtemp(prefix="sdkit-04-"))
wide = folder / "an-sd2-word.safetensors"
save_file({"emb_params": torch.randn(2, 1024)}, str(wide))
try:
    embeddings.apply(pipe, embeddings.load(wide))
except SdkitError as error:
    print(error)

# %% [markdown]
# ## 5. How sdkit reads a prompt: A1111's prompt language
#
# People paste prompts from civitai written for A1111, and sdkit reads them the same way:
#
# * `(word)` is 1.1 times as strong, `((word))` 1.21 times, `(word:1.5)` 1.5 times; `[word]` is 1/1.1 as strong;
# * `\(` is a plain bracket; `BREAK` starts a new chunk of the prompt;
# * the text encoder reads 75 tokens at a time, so a longer prompt is read in chunks of 75 and the chunks are
#   joined, instead of being cut off at 75.
#
# Here is how sdkit splits a prompt into weighted pieces:

# %%
example = "a (moon:1.3) [circle], ((white background)) BREAK \\(no text\\)"
pieces = prompts.parse(example)
display(Markdown("| piece | weight |\n|---|---|\n" + "\n".join(
    f"| `{text!r}` | {'new chunk' if weight == -1 else round(weight, 3)} |" for text, weight in pieces if text)))

# %% [markdown]
# Weights work on the new word too. Mixed with words the model knows, *moon* pulls against them: here the
# prompt asks for a red square first and a moon after it, and the weight decides who wins. (Put *moon* first and
# it wins at any weight: this small text encoder reads the start of a prompt hardest.)

# %%
strengths = [0.5, 1.0, 1.5, 2.0]
images = [generate(pipe, settings.replace(prompt=f"a red square, ({WORD}:{s})", seed=0), progress=False)[0]
          for s in strengths]
plots.grid(images, labels=[f"a red square, ({WORD}:{s})" for s in strengths], cols=len(strengths), size=2.0)

# %% [markdown]
# ## 6. Now try it yourself
#
# The panel's **Embedding** group picks which embedding file the model may use; *(none)* takes them all away,
# so you see what the word means without its file. Type *moon* into any prompt.

# %%
panel = widgets.Panel(MODEL, settings=settings.replace(seed=0), groups=[embeddings.control_group(name=WORD)])
panel.generate(wait=True)
panel

# %% [markdown]
# ## What to take away
#
# * An embedding is a few vectors: a new word for the text encoder. The painter is not changed at all.
# * The file name is the word; it works in the negative prompt too.
# * It only fits text encoders of its width; sdkit refuses the others by name.
# * `(word:1.3)`, `[word]`, `BREAK` and long prompts are read as A1111 reads them.
