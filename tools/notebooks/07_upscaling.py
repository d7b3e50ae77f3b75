# %% [markdown]
# # 07 · Upscaling: bigger pictures with more detail
#
# The blog's `upscale_models` folder holds models that **enlarge a small picture and add detail**. Painting a big
# picture directly is slow (a UNet step at 1024² costs about 4.5 times one at 512²) and a model trained at 512
# paints doubled heads at 1024. So people paint small, then enlarge: with an *upscale model* (ESRGAN,
# Real-ESRGAN, SwinIR, ... from civitai or OpenModelDB), and often with A1111's **hires fix**, which enlarges the
# picture and lets the painter redraw it a little at the big size.
#
# The course's upscaler is **4x_shapes_compact**, a Real-ESRGAN *compact* network the project trained on shapes-world
# pictures. sdkit loads it with **spandrel**, the library ComfyUI uses, which recognises dozens of architectures
# from their tensor names.

# %%
# Setup
import time

import numpy as np
from IPython.display import Markdown, display

from sdkit import checkpoints, hires, plots, upscale, widgets
from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings, generate
from sdkit.paths import ModelPaths
from sdkit.shapes.upscalers import bicubic, held_out, measure, shrink

# %%
# Parameters
MODEL = "shapes-v1"
UPSCALER = "4x_shapes_compact"                # a name from models/upscale_models
HELD_OUT = 32                                 # pictures to measure on (never seen in training)
CROP = (96, 96, 160, 160)                     # the zoomed part of the 256 px pictures: left, top, right, bottom

# %%
pipe = checkpoints.load(MODEL)
model = upscale.load(UPSCALER)
print(upscale.describe(model))

# %% [markdown]
# ## 1. Enlarge a small picture: bicubic vs the upscale model
#
# We draw a shapes-world picture at 256 px (the truth), shrink it to 64 px (what shapes-v1 paints) and enlarge it
# back 4x in two ways: **bicubic**, the classic resize every image program has, which can only blur between the
# pixels it has; and the **upscale model**, which learned what the edges of shapes look like and draws them sharp.

# %%
truth = held_out(1)[0]
small = shrink(truth)
by_bicubic, by_model = bicubic(small), upscale.upscale(model, small, progress=False)
zoom = lambda picture: picture.crop(CROP).resize((256, 256), resample=0)  # noqa: E731  nearest: show the pixels
plots.grid([small.resize((256, 256), resample=0), by_bicubic, by_model, truth, zoom(by_bicubic), zoom(by_model),
            zoom(truth)],
           labels=["64 px (pixels shown big)", "bicubic 4x", f"{UPSCALER} 4x", "the truth (256 px)", "bicubic, zoomed",
                   "model, zoomed", "truth, zoomed"], cols=4, size=2.2)

# %% [markdown]
# ## 2. Measured on 32 pictures it never saw
#
# PSNR (in dB, higher is closer to the truth; +3 dB halves the squared error) and SSIM (structure as the eye sees
# it, 1 = identical), averaged over 32 held-out pictures of every colour, style and angle.

# %%
m = measure(count=HELD_OUT)
display(Markdown(f"| enlarged by | PSNR | SSIM |\n|---|---|---|\n| bicubic | {m['psnr_bicubic']:.2f} dB | "
                 f"{m['ssim_bicubic']:.3f} |\n| {UPSCALER} | {m['psnr_model']:.2f} dB | {m['ssim_model']:.3f} |"))
print(f"the model is {m['gain_db']:+.2f} dB over bicubic; better on {m['wins']} of {HELD_OUT} pictures")
plots.bars({"bicubic": m["psnr_bicubic"], UPSCALER: m["psnr_model"]}, unit="dB",
           title=f"PSNR on {HELD_OUT} held-out pictures")

# %% [markdown]
# Two measures, two answers: PSNR counts every pixel's error, and the model's sharp edges win it by several dB.
# SSIM weighs structure, and in flat areas even tiny changes: the model leaves faint noise (1 level of 255) in
# about a tenth of the flat background that bicubic leaves exactly flat, so its SSIM is a little lower. Look at the
# zoomed crops above and judge which you would rather have.

# %% [markdown]
# ## 3. A painted picture, enlarged
#
# The same on what shapes-v1 paints: a 64 px picture, enlarged 4x. (The upscaler has never seen the VAE's soft
# edges; it sharpens them anyway.)

# %%
settings = GenerationSettings(prompt="a red triangle on a black background", seed=4, steps=20, width=64, height=64)
painted = generate(pipe, settings, progress=False)[0]
plots.grid([painted.resize((256, 256), resample=0), bicubic(painted), upscale.upscale(model, painted, progress=False)],
           labels=["painted, 64 px", "bicubic 4x", f"{UPSCALER} 4x"], cols=3, size=2.6)

# %% [markdown]
# ## 4. Big pictures go in tiles
#
# An upscaler's memory grows with the picture, and a 4x upscale of a 1024² picture makes a 4096² one. sdkit
# (like ComfyUI) cuts the input into **512 px tiles that overlap by 32 px**, enlarges each, and blends the overlaps,
# so memory stays bounded and a progress bar counts the tiles. The seams do not show: here a 256 px picture in
# 64 px tiles against the same picture in one piece.

# %%
picture = upscale.upscale(model, truth, progress=False)  # 256 -> 1024 in one tile
start = time.perf_counter()
tiled = upscale.upscale(model, truth, tile=64, overlap=16, progress=False)
print(f"{upscale.tile_count(256, 256, tile=64, overlap=16)} tiles, {time.perf_counter() - start:.2f} s; largest difference "
      f"from the one-piece picture: {np.abs(np.asarray(tiled, int) - np.asarray(picture, int)).max()} of 255, mean "
      f"{np.abs(np.asarray(tiled, int) - np.asarray(picture, int)).mean():.3f}")
print(f"a 1024² picture is {upscale.tile_count(1024, 1024)} tiles of 512 px")

# %% [markdown]
# Measured by `python -m sdkit bench` on the project's 2-core machine, with a real-size Real-ESRGAN compact
# (realesr-general-x4v3's 64 features x 32 layers, random weights) on a 1024² picture: see the README's bench
# section for the figures (peak memory in tiles vs in one piece).

# %% [markdown]
# ## 5. Hires fix: paint small, enlarge, redraw a little
#
# A1111's hires fix paints at the base size, enlarges (in latent space, with a resize, or with an upscale model),
# then runs the painter again at the big size at a **denoising strength**: 0 keeps the enlarged picture, 1 paints
# a new one. With an upscale model it starts from sharp edges, so a low strength is enough.

# %%
strengths = (0.2, 0.4, 0.6, 0.8)
images = [generate(pipe, settings.replace(hires_scale=2, hires_upscaler=UPSCALER, strength=s), progress=False)[0]
          for s in strengths]
plots.grid(images, labels=[f"hires 2x, {UPSCALER}\nstrength {s}" for s in strengths], cols=4, size=2.0)

# %% [markdown]
# The PNG text says it all, as A1111 writes it, and reads back to the same settings:

# %%
from sdkit.metadata import format_parameters, parse_parameters  # noqa: E402

text = format_parameters(images[1].sdkit_settings)
print(text)
back = parse_parameters(text)
print("reads back the same:", (back.hires_scale, back.hires_upscaler, back.strength, back.hires_steps) ==
      (2, UPSCALER, 0.4, 0))

# %% [markdown]
# ## 6. A file that is not an upscaler is refused
#
# A checkpoint, a VAE or a LoRA dropped into `upscale_models` by mistake is refused with spandrel's reason and what
# the file looks like instead:

# %%
not_an_upscaler = ModelPaths.from_root(None).find("vae", "shapes-v1-warm")  # the VAE of notebook 06
try:
    upscale.load(not_an_upscaler)
except SdkitError as error:
    print(error)

# %% [markdown]
# ## 7. Now try it yourself
#
# The panel's **Hires fix** group: turn it on, pick the upscaler (the built-in ones, then the files in
# `models/upscale_models`) and drag the denoising strength.

# %%
panel = widgets.Panel(MODEL, settings=settings, groups=[hires.control_group(scale=2.0, strength=0.4, upscaler=UPSCALER)])
panel.generate(wait=True)
panel

# %% [markdown]
# ## What to take away
#
# * An upscale model enlarges and adds detail it learned; bicubic can only blur. Measured here: PSNR and SSIM.
# * sdkit loads any upscaler spandrel knows (ESRGAN, Real-ESRGAN, SwinIR, HAT, ...), and refuses other files.
# * Big pictures go in overlapping tiles: bounded memory, no seams.
# * Hires fix = paint small, enlarge, redraw at a low strength. `python -m sdkit upscale IMAGE --model NAME`
#   enlarges any picture from the command line, into a new file.
