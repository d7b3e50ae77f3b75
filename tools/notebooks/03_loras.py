# %% [markdown]
# # 03 · LoRAs: draw it in this style
#
# The blog's `loras` folder holds small files that say **"draw it in this style"**: a LoRA nudges the painter
# (the checkpoint) towards a look it was trained on, without replacing it. On civitai a LoRA is one
# `.safetensors` file of 10-200 MB next to checkpoints of 2-7 GB, and you use it by writing its name in the
# prompt: `<lora:NAME:0.8>`, where 0.8 is how strongly it pushes.
#
# The course's LoRA is **outlines**: trained by the project on outlined shapes, a style shapes-v1 never saw.
# Because the shapes detector can tell an outline from a filled shape, we can *measure* what the weight does.

# %%
# Setup
import tempfile
from pathlib import Path

import numpy as np
from IPython.display import Markdown, display

from sdkit import checkpoints, loras, metadata, plots, testing, widgets
from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings, generate
from sdkit.shapes.evaluate import ADDON_SAMPLES, style_share

# %%
# Parameters
MODEL = "shapes-v1"
LORA = "outlines"                                    # a name from the loras folder
PROMPT = "a yellow square on a black background"
SEED = 3
WEIGHTS = (-1.0, 0.0, 0.5, 1.0, 1.5, 2.0)            # the weights to measure (A1111 allows any number)

# %%
pipe = checkpoints.load(MODEL)
style = loras.load(LORA)
settings = GenerationSettings(prompt=PROMPT, seed=SEED, steps=20, width=64, height=64)

# %% [markdown]
# ## 1. What is inside a LoRA file
#
# A LoRA does not store new weights for the model. For each layer it changes, it stores two thin matrices,
# *down* (rank x inputs) and *up* (outputs x rank), whose product is the **change** to that layer's weights:
#
# &nbsp;&nbsp;&nbsp;&nbsp;new weight = weight + LoRA weight x (alpha / rank) x (up @ down)
#
# With rank 4 instead of the full width, the change takes a small share of the numbers. kohya's trainer (what
# most civitai LoRAs come from) also writes its settings into the file as `ss_*` metadata.

# %%
described = loras.describe(style)
lora_numbers = sum(t.numel() for layer in style.layers.values() for t in layer.tensors.values())
unet_numbers = sum(p.numel() for p in pipe.unet.parameters())
print(f"{style.path.name}: {described['type']}, {described['layers']} layers, rank {described['rank']}, "
      f"family {described['family']} ({described['family_clue']})")
print(f"{lora_numbers:,} numbers, {lora_numbers / unet_numbers:.1%} of the UNet's {unet_numbers:,}")
print("some metadata:", {k: style.metadata[k] for k in ("ss_network_module", "ss_network_dim", "ss_network_args",
                                                          "ss_base_model_version", "ss_steps")})

# %% [markdown]
# ## 2. Turn the weight
#
# Same prompt, same seed; only the LoRA weight changes. At 0 it is the plain painter. At 1 the shape is an
# outline. Above 1 the push overshoots; below 0 it pushes the *other* way.

# %%
pictures = []
for weight in WEIGHTS:
    loras.apply(pipe, [(style, weight)])
    pictures.append(generate(pipe, settings, progress=False)[0])
loras.remove(pipe)
plots.grid(pictures, labels=[f"weight {w:g}" for w in WEIGHTS], cols=len(WEIGHTS), size=1.6,
           title=f"'{PROMPT}' with <lora:{LORA}:weight>")

# %% [markdown]
# ## 3. Measured: how often does the style show?
#
# Sixteen different prompts (every shape, colour and background), one seed each, at each weight; the detector
# says whether each picture is an outline. This is the "Measured effect" table of the LoRA's model card
# (`models/loras/outlines.md`), computed again here.

# %%
shares = style_share(pipe, style, weights=WEIGHTS)
print(", ".join(f"weight {w:g}: {s:.0%}" for w, s in shares.items()))
plots.sweep(list(shares), {"outlined": [100 * s for s in shares.values()]}, xlabel="LoRA weight",
            ylabel=f"% of {ADDON_SAMPLES} pictures", title=f"{LORA}: share of outlined shapes")

# %% [markdown]
# ## 4. In the prompt, as civitai writes it
#
# Nobody calls `loras.apply` by hand: you write `<lora:outlines:0.8>` in the prompt, as in A1111. sdkit takes the
# tag out of the text the model reads, applies the LoRA at that weight, and keeps the tag in the picture's
# settings, so the PNG says which LoRA made it. `Lora hashes` is how civitai links the picture to the LoRA's page.
#
# Taking the LoRA off restores every weight **bit for bit**: the picture without the tag is exactly the one
# from before.

# %%
before = generate(pipe, settings, progress=False)[0]
tagged = generate(pipe, settings.replace(prompt=f"{PROMPT} <lora:{LORA}:0.8>"), progress=False)[0]
after = generate(pipe, settings, progress=False)[0]
print(metadata.format_parameters(tagged.sdkit_settings, model_hash=pipe.sdkit.autov2))
print("\nwithout the tag, same pixels as before:", np.array_equal(np.asarray(before), np.asarray(after)))
plots.grid([before, tagged, after], labels=["before", "<lora:outlines:0.8>", "tag removed"], cols=3, size=1.6)

# %% [markdown]
# ## 5. A LoRA for another painter is refused
#
# A LoRA changes particular layers of one model family. An SDXL LoRA on an SD1.5 checkpoint would change
# layers that are not there, or have other sizes; ComfyUI and diffusers skip what does not fit and say little.
# sdkit refuses the file **before anything changes**, naming both families. We write a tiny random LoRA in
# kohya's SDXL layout and try it:

# %%
folder = Path(tempfile.mkdtemp(prefix="sdkit-03-"))
xl_lora = folder / "an-sdxl-style.safetensors"
testing.write_lora(testing.tiny_pipeline("sdxl"), xl_lora, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
try:
    loras.apply(pipe, [(loras.load(xl_lora), 1.0)])
except SdkitError as error:
    print(error)
print("next picture unchanged:", np.array_equal(np.asarray(generate(pipe, settings, progress=False)[0]),
                                                 np.asarray(before)))

# %% [markdown]
# ## 6. Now try it yourself
#
# The panel's **LoRA** group picks a file from the loras folder and turns its weight from -1 to 2. It writes the
# `<lora:…>` tag into the prompt for each run, so *Use* under a picture brings the weight back. Drag the weight
# and watch the outline come and go.

# %%
panel = widgets.Panel(MODEL, settings=settings, groups=[loras.control_group(name=LORA, weight=1.0)])
panel.generate(wait=True)
panel

# %% [markdown]
# ## What to take away
#
# * A LoRA stores a *change* to some of the painter's layers, as two thin matrices per layer.
# * Its weight scales that change: 0 is the plain painter, 1 what it was trained for, above 1 overshoots, below 0
#   pushes the other way.
# * Write it in the prompt as `<lora:NAME:WEIGHT>`; the PNG records it with its hash.
# * A LoRA only fits the family it was trained for; sdkit refuses the others before changing anything.
