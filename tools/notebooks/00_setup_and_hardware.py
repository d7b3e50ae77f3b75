# %% [markdown]
# # 00 · Setup and hardware: what can this computer do?
#
# Image models are big piles of numbers that get multiplied, over and over. How fast that goes depends on
# **where** the multiplying happens and **how precisely** each number is stored.
#
# * A **CPU** is the computer's general-purpose chip: a few strong cores. Every laptop has one.
# * An **iGPU** (integrated GPU) shares the CPU's chip and memory: AMD's Radeon graphics (reached through ROCm)
#   or Intel's Arc/Iris graphics (reached through XPU).
# * A **discrete GPU** is a separate card with its own fast memory. This course assumes you do **not** have one.
#
# This notebook asks your machine what it has, measures it, and works out which models fit.

# %%
# Setup: the course's helper package. Everything a notebook does lives in sdkit; the notebook tells the story.
from IPython.display import Markdown, display

import sdkit
from sdkit import device, plots, speed

# %%
# Parameters: change these and run the notebook again.
MATMUL_SIZE = 1024   # the matrices multiplied below are MATMUL_SIZE x MATMUL_SIZE
REPEATS = 5          # best of this many timings

# %% [markdown]
# ## 1. What this machine has
#
# `sdkit.device.report()` looks at the CPU (its name, cores and the instruction-set extensions that matter for
# multiplying matrices: **AMX**, **AVX512-BF16**, **AVX512**, **AVX2**), the memory, and any GPU that PyTorch can
# use (NVIDIA CUDA, AMD ROCm, Intel XPU, Apple MPS). Then it picks a device and a number format for each part of
# an image model, and says why. The same report is `python -m sdkit device` in a terminal.

# %%
report = device.report()
print(report)

# %% [markdown]
# ## 2. fp32, bf16, fp16: how precisely is each number stored?
#
# * **fp32** (32-bit float): the default. Exact enough for everything, 4 bytes per number.
# * **fp16** (16-bit float): half the memory, but it overflows above 65,504, which is how VAEs produce black or NaN images.
# * **bf16** (brain float 16): half the memory with fp32's range and less precision. CPUs with **AVX512-BF16** or
#   **AMX** units multiply bf16 much faster than fp32; CPUs without them only pretend to.
#
# Let's measure it on *this* machine rather than believe it: one matrix multiplication, timed in each format.

# %%
speeds = {dtype: device.matmul_gflops(dtype=dtype, size=MATMUL_SIZE, repeats=REPEATS)
          for dtype in ("float32", "bfloat16")}
ratio = speeds["bfloat16"] / speeds["float32"]
print(f"bf16 is {ratio:.1f}x {'faster' if ratio > 1 else 'slower'} than fp32 here; "
      f"sdkit picked {report.choices['unet'].dtype} for the UNet.")
plots.bars(speeds, title=f"{MATMUL_SIZE}x{MATMUL_SIZE} matmul on {report.cpu}", unit="GFLOP/s")

# %% [markdown]
# ## 3. Measured, not guessed: which set-up runs a UNet fastest here?
#
# A matrix multiplication is only part of an image model's step: there are convolutions, attention and
# normalisations too, and how fast they run also depends on the **memory layout**. *Channels-last* stores each
# pixel's channels side by side, which the convolution library on CPUs (oneDNN) usually prefers; *contiguous*
# stores each channel as a whole picture. A third way is **OpenVINO**, Intel's inference engine (the one FastSD CPU
# runs on): sdkit converts the UNet to it and OpenVINO compiles the whole graph with its own fused kernels. sdkit
# times one level of the real SD1.5 UNet (its costliest: 320 channels, attention over every latent position) in each
# format and way, keeps the fastest for this machine, and every later notebook and `python -m sdkit` command here
# uses it. The guess from the CPU's features is replaced only when another set-up is clearly (over 10%) faster,
# because timings jitter.

# %%
if report.accelerator == "none":
    measured = speed.measure()
    device.report.cache_clear()  # the report's choices now include the measurement
    report = device.report()
    display(plots.bars({speed.label(name): seconds for name, seconds in measured.seconds.items()},
                       title=f"one SD1.5 first-level UNet call at {speed.LATENT * 8}², lower is faster",
                       unit="seconds"))  # inside `if`, a chart is shown only when displayed
unet = report.choices["unet"]
print(f"UNet: {unet.dtype} {'in OpenVINO' if unet.backend == 'openvino' else unet.layout}: {unet.reason}")

# %% [markdown]
# ## 4. How much memory does a model need?
#
# A model's weights need (number of parameters) x (bytes per parameter). Below: the weights alone of the
# three families this course meets, in each format (the VAE is always counted in fp32). Generating needs a
# little more on top for the working images. "too big here" means more than 80% of this machine's RAM.
# `gguf_q4` is the 4-bit GGUF format people use for FLUX on small machines.

# %%
rows = device.memory_table()
header = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
display(Markdown(header + "\n".join("| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows)))

# %% [markdown]
# ## What to take away
#
# * Your CPU's extensions decide whether bf16 is a free 2-9x speed-up or a slowdown: sdkit checks, measures and
#   chooses, and `python -m sdkit device` says why.
# * SD1.5 fits anywhere; SDXL wants bf16 on a 16 GiB laptop; FLUX needs 8-bit or 4-bit files on most machines.
