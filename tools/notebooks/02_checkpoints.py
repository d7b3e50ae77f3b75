# %% [markdown]
# # 02 · Checkpoints: the painter
#
# The blog this course follows calls the checkpoint **the painter**: the main model, the file that turns
# "a sheep" into pixels. Everything else (LoRAs, embeddings, ControlNet, VAEs) adjusts how this painter works.
#
# On civitai a checkpoint is usually **one file**, `NAME.safetensors`, a few GB. Inside are several models
# that work together, stored as named tensors (arrays of numbers). This notebook opens that file: what is inside,
# how a program tells which family it belongs to, what the hash on civitai is, how much memory it needs, and
# what changes when you switch the painter.
#
# Real checkpoints are 2-7 GB and cannot be downloaded in a classroom, so we use the course's own **shapes-v1**
# and tiny random files written in exactly the SD1, SD2 and SDXL layouts: the same names, much smaller numbers.

# %%
# Setup
import os
import tempfile
from pathlib import Path

from IPython.display import Markdown, display

from sdkit import checkpoints, device, formats, plots, testing, widgets
from sdkit.generate import GenerationSettings, generate
from sdkit.paths import ModelPaths


def table(rows: list[dict]) -> None:
    """Show a list of dicts as a Markdown table."""
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    display(Markdown(head + "\n".join("| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows)))

# %%
# Parameters
MODEL = "shapes-v1"                          # a name from the model folders, or a path to a .safetensors file
PROMPT = "a blue triangle on a white background"
SEED = 5
FOLDER = Path(tempfile.mkdtemp(prefix="sdkit-02-"))  # where the tiny stand-in files are written

# %% [markdown]
# ## 1. What is inside a checkpoint
#
# A `.safetensors` file starts with a small header listing every tensor's name, number format and shape; the
# numbers follow. Reading just the header tells a lot without loading anything. The names start with the part
# they belong to, in the layout Stable Diffusion's original code used (and A1111, ComfyUI and civitai still use):
#
# * `model.diffusion_model.` the **UNet**, which removes noise step by step: the painter's hand;
# * `first_stage_model.` the **VAE**, which turns the UNet's small "latent" picture into pixels;
# * `cond_stage_model.` (SDXL: `conditioner.embedders.`) the **text encoder**, which turns the prompt into numbers.

# %%
path = ModelPaths.from_root().find("checkpoints", MODEL)
specs, metadata = formats.read_specs(path)
print(f"{path.name}: {len(specs)} tensors, {path.stat().st_size / 2**20:.1f} MiB")
table(formats.parts(specs))
print("a few tensor names:", *sorted(specs)[:3], "...", sep="\n  ")

# %% [markdown]
# ## 2. The hash civitai shows
#
# civitai and A1111 identify a file by its **AutoV2 hash**: the first 10 hex digits of the SHA-256 of the whole file.
# Two files with the same AutoV2 are the same file, whatever their names. Every image sdkit saves records it as
# `Model hash`, so anyone can find the exact painter that made it.

# %%
info = formats.info(path)
print(f"AutoV2 {info['autov2']}   (sha256 {info['sha256']})")

# %% [markdown]
# ## 3. Which family is it?
#
# The file does not say "I am SDXL". The family shows in the names: SD1 keeps OpenAI's CLIP text encoder under
# `cond_stage_model.transformer.`, SD2 keeps OpenCLIP under `cond_stage_model.model.`, SDXL has two text encoders
# under `conditioner.embedders.0/1`, and FLUX has a transformer with `double_blocks` instead of a UNet. The family
# decides the picture size the model was trained for and which LoRAs, embeddings and ControlNets fit it.
#
# We write tiny stand-ins in each real layout (random numbers, a few MB each) and ask which family each is. The
# FLUX file is an *all-in-one* as civitai and ComfyUI ship it: transformer, VAE and both text encoders (CLIP-L and
# T5-XXL) in one file; it has one small tensor per part, enough to be recognised.

# %%
files = {family: FOLDER / "checkpoints" / f"tiny-{family}.safetensors" for family in ("sd1", "sd2", "sdxl")}
for family, file in files.items():
    testing.write_tiny(family, file, vae_levels=4)  # 8x smaller latents, as in the real families
flux = testing.write_named(FOLDER / "flux-all-in-one.safetensors")
rows = []
for file in [path, *files.values(), flux]:
    file_specs, file_meta = formats.read_specs(file)
    family, clue = formats.explain_family(file_specs, file_meta)
    rows.append({"file": file.name, "family": family, "native size": formats.NATIVE_SIZE.get(family),
                 "parts": ", ".join(formats.components(list(file_specs))), "decided by": f"`{clue}`"})
table(rows)

# %% [markdown]
# ## 4. How much memory does a painter need?
#
# Loaded, every parameter takes 4 bytes in fp32 and 2 in bf16 or fp16. sdkit picks the format for this machine
# (notebook 00) and refuses, before loading, a file that will not fit in the free memory.

# %%
choices = device.choose(device.report())
need = checkpoints.memory_needed_gib(specs, choices)
print(f"{path.name} needs {need * 1024:.0f} MiB loaded here ({choices['unet'].dtype}); "
      f"this machine has {device.report().ram_gib:.0f} GiB")
table(device.memory_table())

# %% [markdown]
# ## 5. Switch the painter
#
# Same prompt, same seed, two checkpoints. The trained shapes-v1 paints what was asked. The tiny SD1 file has the
# same architecture and layout, but its weights are random: it never learned anything, so it paints noise.
# Everything a picture has comes from the checkpoint's numbers.

# %%
settings = GenerationSettings(prompt=PROMPT, seed=SEED, steps=20)
painters = {MODEL: checkpoints.load(MODEL), "tiny-sd1 (random)": checkpoints.load(files["sd1"])}
pictures = [generate(pipe, settings.replace(width=64, height=64), progress=False)[0] for pipe in painters.values()]
plots.grid(pictures, labels=list(painters), cols=2, size=2.2, title=f"'{PROMPT}', seed {SEED}")

# %% [markdown]
# ## 6. Now try it yourself
#
# The panel finds checkpoints in the model folders: the bundled `models/`, or the folder the `SDKIT_MODELS`
# environment variable names (a ComfyUI or A1111 install works as it is). We point it at the stand-ins too, so
# the **Model** list offers four painters. Picking one loads it and sets the sliders to its family's ranges: 64
# px and auto-run for shapes-v1; 512 px (SD1), 768 px (SD2) or 1024 px (SDXL) and auto-run off for the others,
# since on a real model of those families one picture takes a minute on a CPU. (The stand-ins are tiny, so here
# it is quick.)

# %%
os.environ["SDKIT_MODELS"] = str(FOLDER)
panel = widgets.Panel(MODEL, settings=settings.replace(width=64, height=64))
panel.generate(wait=True)
panel

# %% [markdown]
# ## What to take away
#
# * A checkpoint is one file holding several models: UNet (the painter's hand), VAE (pixels), text encoder(s).
# * Its family is written in its tensor names; it decides the size, the memory, and which add-ons fit.
# * The AutoV2 hash names the exact file; sdkit records it in every picture it saves.
# * A checkpoint's weights *are* the painter: same architecture with other numbers paints something else.
