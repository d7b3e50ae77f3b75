# %% [markdown]
# # 09 · Speed on a CPU: why one set-up takes minutes and another seconds
#
# An image model spends almost all its time multiplying matrices. So the question "how fast can this CPU make
# an image?" has a measurable answer: count the multiplications a step needs (its **FLOPs**), measure how many
# the CPU can do per second (its **peak**), and compare what a program actually reaches.
#
# Here we do that for the real Stable Diffusion 1.5 UNet. Its weights are random (nothing to download), which does
# not change the time a step takes: only the shapes do. `python -m sdkit bench` is the full version of this notebook.

# %%
# Setup
from IPython.display import Markdown, display

from sdkit import bench, checkpoints, device, fast, plots, widgets
from sdkit.generate import GenerationSettings, generate

# %%
# Parameters
SIZE = 256        # image side in pixels for the timed UNet step (512 is the real thing; 256 keeps this notebook quick)
REPEATS = 1       # timed calls after one warm-up

# %% [markdown]
# ## 1. The limit: how fast can this CPU multiply?
#
# A large matrix multiplication (GEMM) is the fastest thing a CPU does. Its speed in each number format is the
# ceiling for everything else. CPUs with **AMX** or **AVX512-BF16** units multiply bf16 many times faster than fp32.

# %%
report = device.report()
peaks = {dtype: bench.gemm_peak(dtype=dtype) for dtype in ("float32", "bfloat16")}
print(f"bf16 / fp32 = {peaks['bfloat16'] / peaks['float32']:.1f}x; sdkit runs the UNet in {report.choices['unet'].dtype}: "
      f"{report.choices['unet'].reason}")
plots.bars(peaks, title=f"GEMM peak on {report.cpu}", unit="GFLOP/s")

# %% [markdown]
# ## 2. How much work is one step?
#
# PyTorch can count the FLOPs of a model call without doing the arithmetic (on the "meta" device, which only
# tracks shapes). One step with CFG runs the UNet twice: with the prompt and without it.

# %%
sizes = [256, 512, 768, 1024]
gflop = {f"{s}x{s}": bench.count_gflop(bench.Case("u", "sd1", "unet", s, 2)) for s in sizes}
print(f"4x the pixels (512 -> 1024) costs {gflop['1024x1024'] / gflop['512x512']:.1f}x the work: attention grows faster")
plots.bars(gflop, title="SD1.5 UNet: one CFG step", unit="GFLOP")

# %% [markdown]
# ## 3. Default vs sdkit, measured
#
# The **default** is what a new user gets from diffusers: fp32 everywhere. **sdkit's path** is what `sdkit.device`
# picked for this machine (bf16 where the CPU has bf16 units, channels-last memory for the convolutions), the same
# code `checkpoints.load` uses. Same inputs, same step. The share of the peak compares the best timed call with the
# best GEMM, since on a busy or shared CPU single timings vary.

# %%
case = bench.Case(f"unet_sd15_{SIZE}", "sd1", "unet", SIZE, 2)
row = bench.bench_case(case, peaks=peaks, repeats=REPEATS, profile=True)
row |= bench.fractions(row, bench.raise_peaks(peaks))  # measure the peak again: keep the best seen
times = {"diffusers default (fp32)": row["default"]["seconds"], f"sdkit ({row['sdkit']['dtype']})": row["sdkit"]["seconds"]}
display(Markdown(
    f"| path | seconds | GFLOP/s | share of the bf16 peak |\n|---|---|---|---|\n"
    f"| default | {row['default']['seconds']:.2f} | {row['default']['gflops']:.0f} | "
    f"{row['default']['best_gflops'] / peaks['bfloat16']:.0%} |\n"
    f"| sdkit | {row['sdkit']['seconds']:.2f} | {row['sdkit']['gflops']:.0f} | {row['fraction_of_bf16_peak']:.0%} |"))
print(f"speed-up {row['speedup_vs_default']:.1f}x; the output differs from fp32 by "
      f"{row['relative_error_vs_fp32']:.2%} (relative error)")
plots.bars(times, title=f"SD1.5 UNet, one CFG step at {SIZE}x{SIZE}", unit="s")

# %% [markdown]
# ## 4. Where the time goes
#
# Not every operation is a matrix multiplication. PyTorch's profiler times each operator; grouping them shows
# which kinds reach the peak and which do not. Convolutions and linear layers are multiplications. Attention
# multiplies too, but it also takes an exponential of every score (the softmax), and AMX units cannot do
# exponentials. "Other" is norms, activations and additions: no multiplications at all, only memory traffic.
# "Between" is the rest of the step's time: Python and PyTorch's dispatch between one operator and the next.
# On a CPU sdkit runs some of "other" inside the multiplications, as they write their output: a bias, a residual
# add, GEGLU's gelu and multiply (`sdkit.fusion`; `SDKIT_FUSE=0` before loading turns it off, to compare).

# %%
parts = row["breakdown"]  # profiled during the timing above
display(Markdown("| kind | share of the step | GFLOP | GFLOP/s |\n|---|---|---|---|\n" + "\n".join(
    f"| {kind} | {p['share']:.0%} | {p['gflop']:.0f} | {p['gflops'] or 0:.0f} |".replace("| 0 | 0 |", "| none | - |")
    for kind, p in parts.items())))
tokens = (SIZE // 8) ** 2
print(f"At {SIZE}x{SIZE} the first attention layers compare {tokens:,} latent positions with each other: "
      f"{tokens**2 * 8 * 2 / 1e6:,.0f} million exponentials per layer (8 heads, 2 CFG passes). At 512x512 it is 16x that.")
plots.bars({kind: p["seconds"] for kind, p in parts.items()}, title=f"SD1.5 UNet step at {SIZE}x{SIZE}, by operator kind",
           unit="s")

# %% [markdown]
# ## 5. Is the faster picture the same picture?
#
# Speed must not cost quality. We make the same images with the course's trained shapes model in fp32 and on
# sdkit's path and compare them: PSNR above 30 dB means the difference is invisible.

# %%
q = bench.quality()
print(f"latent relative error {q['latent_relative_error']:.4f}, decoded images PSNR {q['psnr_db']:.1f} dB; "
      f"the VAE alone (same latents, {q['dtypes']['vae']} vs fp32): {q['vae_psnr_db']:.1f} dB")

# %% [markdown]
# ## 6. Fast mode: fewer FLOPs per image
#
# When the step cannot get faster, do fewer of them, or make some of them smaller. Fast mode makes four trades,
# each a setting the picture's text records:
#
# * **half the steps** with DPM++ 2M Karras, a sampler that gets as far in 10 steps as euler does in 20;
# * **DeepCache**: the UNet's deep blocks run every 2nd step; in between only the outermost blocks run and the deep
#   features of the step before are reused (they change slowly from step to step);
# * **CFG until 50%**: after half the steps the negative prompt's pass stops (the layout is settled by then), so
#   each step runs the UNet once instead of twice;
# * **token merging 50%** (ToMe, as A1111's "Token merging ratio"): in the largest self-attention, half the tokens
#   (picture patches) are averaged into a similar neighbour before the attention and copied back after it. The
#   attention's cost grows with the square of the token count, so this pays little at 512x512 and most at large sizes.
#
# What it costs is measured, not promised: the same prompts and seeds with and without it, judged by the shapes
# detector, and the pixel difference (PSNR; a different sampler alone already changes the pixels).

# %%
shapes = checkpoints.load("shapes-v1")
cost = bench.fast_quality(shapes, seeds=1)  # every full caption, one seed, both ways
display(Markdown(
    f"| | full: 20 steps euler_a, CFG every step | fast mode |\n|---|---|---|\n"
    f"| detector: colour, shape and background all right | {cost['accuracy']['full']:.0%} | {cost['accuracy']['fast']:.0%} |\n"
    f"| seconds per 64 px image (shapes-v1) | {cost['seconds_per_image']['full']:.2f} | {cost['seconds_per_image']['fast']:.2f} |"))
print(f"fast vs full picture, same prompt and seed: PSNR {cost['psnr_db']:.1f} dB, SSIM {cost['ssim']:.2f} "
      f"(median of {cost['pairs']}): a slightly different picture of the same thing")

# %%
prompts = ["a red circle on a white background", "a blue triangle on a black background",
           "a green square on a white background", "a yellow square on a black background"]
base = GenerationSettings(width=64, height=64, seed=1, **bench.FULL)  # the course's default run
pairs = [generate(shapes, run, progress=False)[0] for p in prompts
         for run in (base.replace(prompt=p), fast.apply(base.replace(prompt=p)))]
plots.grid(pairs, labels=[f"{kind}: {p.split(' on ')[0][2:]}" for p in prompts for kind in ("full", "fast")], cols=4,
           title="the same prompt and seed, full and fast")

# %% [markdown]
# On the real SD1.5 UNet the trades pay more than on this small model, because there most of the time is the
# big first level (which DeepCache keeps) and the CFG pass (which stops). `python -m sdkit bench --fast-mode` times a
# 512x512 image both ways, and token merging alone at 512 and 1024; the README has the measurement. The panel at the end has fast mode's switch and dials.
#
# ## 7. Other CPU engines
#
# `python -m sdkit bench --peers` puts sdkit beside the engines a CPU user would otherwise pick, on the same SD1.5
# file: **OpenVINO** (the engine of FastSD CPU) and **stable-diffusion.cpp** (C++, GGUF quantization). They are
# optional (`pip install '.[peers]'`), take minutes to convert or build, and the course does not need them; the
# README shows their table from the project's machine. There, in bf16, with its convolution weights packed once and
# its biases and adds fused (sections 4 and the README), sdkit's UNet step with CFG was 3% faster than OpenVINO's
# (3.37 s vs 3.50 s, faster in 8 of 9 rounds) in half the memory, and stable-diffusion.cpp was over 15x slower. With
# both forced to fp32, as on a laptop CPU without bf16 units, OpenVINO was ahead in an earlier run: 1.1-1.4x, most of
# it in the convolutions. So where OpenVINO is installed (the course installs it), the measurement in notebook 00
# also times the UNet converted to OpenVINO, and where that is clearly faster sdkit runs the UNet there: the first
# picture converts it (about 25 s for SD1.5 on the project's machine), and pictures it does not take (LoRAs,
# ControlNet, SDXL, DeepCache, token merging) run in PyTorch, with a note under the picture.

# %% [markdown]
# ## What to take away
#
# * Time per step = FLOPs / (peak x the share of the peak a program reaches).
# * The share has a ceiling below 100%: attention's exponentials and the norms and activations between the
#   multiplications do not run on the matrix units. That, not a missing trick, is why a CPU step at 512x512 takes
#   seconds.
# * Matching the number format to the CPU (bf16 on AMX / AVX512-BF16 machines, fp32 elsewhere) is the biggest
#   single win on a CPU; `sdkit.device` makes that choice and says why.
# * Fewer FLOPs per image is the other lever: fast mode (fewer steps, DeepCache, CFG only while it matters, token
#   merging) trades a little of the picture for time, and says exactly what it traded.
# * `python -m sdkit bench` measures every part (text encoders, UNets, VAE decoders) and whole generations on your
#   machine; the README has the table measured on the project's machine.

# %% [markdown]
# ## Feel it: a slider move
#
# On the course's small model a whole picture takes well under a second, so the panel re-renders as you drag. The
# live preview shows the picture while it denoises; it costs a little each step (a small matrix product and a PNG
# sent to the browser). Measured here: seconds from a slider change to the finished picture on the panel. The panel
# below starts with fast mode on: open its "Fast mode" group, turn the switch off and compare.

# %%
latency = bench.slider_latency(moves=3)
print(f"slider move -> new picture: {latency['with_preview']['median_s']:.2f} s with live preview, "
      f"{latency['without_preview']['median_s']:.2f} s without ({latency['steps']} steps, median of 3)")
panel = widgets.Panel("shapes-v1", groups=[fast.control_group(on=True)])
panel.generate(wait=True)
panel
