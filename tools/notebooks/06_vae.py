# %% [markdown]
# # 06 · VAE: colour and final detail
#
# The blog's `vae` folder is **colour and final detail**. The painter (the UNet) does not paint pixels: it paints
# a small grid of *latents*, 8 times smaller than the picture for SD1.5 and SDXL (4 times for shapes-v1), and the
# VAE's decoder turns them into the picture at the very end. So the VAE decides the last word on colour and fine
# detail: the same latents through another VAE give other colours. A checkpoint whose VAE is missing or wrong looks
# grey and washed out; that is why civitai pages often say *"use this VAE"*.
#
# The course bundles two extra decoders for shapes-v1: **shapes-v1-warm**, a VAE with a warm colour grade, and
# **taesd_shapes_decoder**, a *tiny* decoder (TAESD) that is ten times faster and a little less exact; the panel's
# live preview uses it.

# %%
# Setup
import tempfile
from pathlib import Path

import numpy as np
import torch
from IPython.display import Markdown, display
from PIL import Image
from safetensors.torch import save_file

from sdkit import bench, checkpoints, plots, vae, widgets
from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings, generate
from sdkit.shapes.decoders import compare

# %%
# Parameters
MODEL = "shapes-v1"
OTHER_VAE = "shapes-v1-warm"                  # a name from models/vae
TINY = "taesd_shapes_decoder"                 # a name from models/vae_approx
PICTURES = 16                                 # drawn pictures to measure on
BIG = 1024                                    # picture side for the memory measurement (whole vs tiled)

# %%
pipe = checkpoints.load(MODEL)
warm, tiny = vae.load(OTHER_VAE), vae.load(TINY)
settings = GenerationSettings(prompt="a blue circle on a white background", seed=1, steps=20, width=64, height=64)

# %% [markdown]
# ## 1. What the painter hands the VAE
#
# A 64x64 picture from shapes-v1 is painted as 16x16 latents with 4 channels: 1,024 numbers for 12,288 pixel values.
# Here are the four channels of one picture's latents (as grey images) and what the VAE makes of them.

# %%
final = []
picture = generate(pipe, settings, progress=False,
                   on_step=lambda done, total, latents, _x0: final.append(latents) if done == total else None)[0]
channels = [Image.fromarray(((c - c.min()) / (c.max() - c.min()) * 255).numpy().astype(np.uint8)).convert("RGB")
            for c in final[-1][0].float()]
plots.grid(channels + [picture], labels=[f"latent channel {i}" for i in range(4)] + ["decoded picture"], cols=5,
           size=1.6)

# %% [markdown]
# ## 2. The same latents, three decoders
#
# We draw 16 shapes-world pictures (the exact truth), let shapes-v1's VAE *encode* them into latents, and decode
# those same latents with the model's own VAE, the warm VAE and the tiny decoder. The colour error is the mean
# difference per colour channel from the drawing (0 = exact, 255 = opposite); the time is one 512x512 decode.

# %%
result = compare(pipe, {"own VAE": None, OTHER_VAE: warm, "tiny decoder": tiny}, count=PICTURES)
rows = result["rows"]
shown = [result["references"][i] for i in range(4)]
labels = ["drawn (the truth)"] * 4
for name, row in rows.items():
    shown += row["pictures"][:4]
    labels += [name] * 4
plots.grid(shown, labels=labels, cols=4, size=1.5)

# %%
display(Markdown("| decoder | colour error (0-255) | shift R / G / B | detector agrees | 512² decode |\n|---|---|---|---|---|\n"
                 + "\n".join(f"| {n} | {r['colour_error']:.1f} | {r['shift_rgb'][0]:+.1f} / {r['shift_rgb'][1]:+.1f} / "
                             f"{r['shift_rgb'][2]:+.1f} | {r['detector_same']:.0%} | {r['seconds'] * 1000:.0f} ms |"
                             for n, r in rows.items())))
speedup = rows["own VAE"]["seconds"] / rows["tiny decoder"]["seconds"]
print(f"the tiny decoder is {speedup:.1f}x faster than the full VAE at 512²")
plots.bars({n: r["colour_error"] for n, r in rows.items()}, unit="of 255", title="colour error against the drawing")

# %% [markdown]
# The warm VAE moves every colour the same way (red up, blue down): the shapes are the same, only the grade
# changed. The tiny decoder was trained to copy the full VAE, so its error is the full VAE's plus a little of its
# own; what it buys is speed, which is why previews use it.

# %% [markdown]
# ## 3. Swap the VAE on a model, and swap it back
#
# `vae.apply` makes a pipeline decode with another VAE (first checking that it speaks this model's latent
# language); `vae.restore` brings the checkpoint's own back, the very same object, so the pictures come back bit
# for bit. The PNG text records `VAE` and `VAE hash`, as A1111 does.

# %%
before = generate(pipe, settings, progress=False)[0]
vae.apply(pipe, warm)
swapped = generate(pipe, settings, progress=False)[0]
vae.restore(pipe)
after = generate(pipe, settings, progress=False)[0]
print("swapped picture differs:", not np.array_equal(np.asarray(before), np.asarray(swapped)))
print("swapped back, identical to before:", np.array_equal(np.asarray(before), np.asarray(after)))
print("PNG text of the swapped one:", {k: swapped.sdkit_settings.extra[k] for k in ("VAE", "VAE hash")})
plots.grid([before, swapped, after], labels=["own VAE", OTHER_VAE, "own VAE again"], cols=3, size=2.0)

# %% [markdown]
# ## 4. A VAE for another model is refused
#
# An SD3 or FLUX VAE reads 16-channel latents; an SDXL VAE reads 4 channels but another latent *language*. sdkit
# checks both before anything changes: the channel count, and a test picture of six colour patches. A VAE for this
# model may grade the colours its own way (the warm one does), but it keeps them apart as the model's own VAE does:
# their patch colours correlate above 0.9. Here is a VAE with shapes-v1's shape but other weights, as an SDXL VAE
# is for SD1.5:

# %%
from diffusers import AutoencoderKL  # noqa: E402

folder = Path(tempfile.mkdtemp(prefix="sdkit-06-"))
torch.manual_seed(3)
stranger = AutoencoderKL.from_config(dict(vae.original(pipe).config))
save_file({k: v.contiguous() for k, v in stranger.state_dict().items()}, str(folder / "a-stranger-vae.safetensors"),
          metadata={"modelspec.architecture": "sdkit-shapes-v1/vae"})
try:
    vae.apply(pipe, vae.load(folder / "a-stranger-vae.safetensors"))
except SdkitError as error:
    print(error)
print("the model still decodes with:", vae.active(pipe) or "its own VAE")

# %% [markdown]
# ## 5. Big pictures: decode in tiles
#
# The decoder's memory grows with the picture: a whole 2048² SD1.5 decode took 10.1 GiB on the project's machine
# (the README's bench table), more than many laptops have free. Decoding in overlapping **tiles** keeps memory
# bounded (1.45 GiB there, at any size); for SD1.5 it costs extra time, as the overlaps are decoded twice. Here the
# same measurement with shapes-v1's small VAE, each run in a fresh process so one's peak does not hide the other's
# (the peak includes Python and PyTorch themselves, about 0.7 GiB). With this VAE, tiles are even faster: its
# attention layer runs at a quarter of the picture's side, and attention's cost grows with the square of its size.

# %%
memory = bench.vae_memory(sizes=(BIG,), family="shapes")
for name, row in memory.items():
    print(f"{name}: " + (f"did not run: {row['error']}" if "error" in row else
                         f"{row['seconds']:.2f} s, peak memory {row['peak_rss_gib']:.2f} GiB"))
plots.bars({name.replace("_", " "): row.get("peak_rss_gib", 0) for name, row in memory.items()}, unit="GiB",
           title=f"peak memory of one {BIG}² decode (the whole process)")

# %% [markdown]
# sdkit decodes in tiles by itself above 1024x1024 (`vae.decode(..., tiled=None)`); `tiled=True` forces it.

# %% [markdown]
# ## 6. Now try it yourself
#
# The panel's **VAE** group picks the decoder: the checkpoint's own, a file from `models/vae`, or a tiny decoder
# from `models/vae_approx`. Switch between them with the same seed and watch only the colours change.

# %%
panel = widgets.Panel(MODEL, settings=settings, groups=[vae.control_group(name=OTHER_VAE)])
panel.generate(wait=True)
panel

# %% [markdown]
# ## What to take away
#
# * The UNet paints latents; the VAE turns them into pixels and has the last word on colour and fine detail.
# * Another VAE for the same model changes colours measurably; `vae.restore` gives back every pixel.
# * A VAE for another model is refused before anything changes.
# * Tiny decoders (TAESD) are about ten times faster and a little less exact: right for previews.
# * Big pictures decode in tiles, so memory stays bounded.
