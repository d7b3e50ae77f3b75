"""The performance benchmark: diffusers' default fp32 path vs sdkit's chosen path, against this machine's GEMM peak.

Models are built at their real sizes from the configs sdkit ships, with random weights: no download is needed and
the time a step takes does not depend on the weight values. FLOPs are counted by PyTorch's FlopCounterMode on the
meta device (shapes only, no arithmetic), not guessed.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sdkit import device
from sdkit.allocator import trim as trim_heap
from sdkit.checkpoints import CONFIGS, from_shipped_config
from sdkit.optimize import describe, prepare

# The text-encoder / latent widths of each family, for building inputs.
CONTEXT = {"sd1": 768, "sd2": 1024, "sdxl": 2048, "shapes": 64}


@dataclass(frozen=True)
class Case:
    """One model part at one size: what gets timed."""

    name: str
    family: str
    part: str  # unet | text_encoder | text_encoder_2 | vae_decoder | tiny_decoder
    size: int = 512  # image side in pixels
    batch: int = 1  # 2 = a classifier-free-guidance step (with and without the prompt)


CASES = {c.name: c for c in [
    Case("unet_sd15_512", "sd1", "unet", 512, 2),
    Case("unet_sd15_256", "sd1", "unet", 256, 2),
    Case("unet_sd15_768", "sd1", "unet", 768, 2),
    Case("unet_sd15_1024", "sd1", "unet", 1024, 2),
    Case("unet_sd21_512", "sd2", "unet", 512, 1),
    Case("unet_sdxl_1024", "sdxl", "unet", 1024, 1),
    Case("text_clip_l", "sd1", "text_encoder", batch=2),
    Case("text_open_clip_h", "sd2", "text_encoder", batch=2),
    Case("text_sdxl_big_g", "sdxl", "text_encoder_2", batch=2),
    Case("vae_decoder_512", "sd1", "vae_decoder"),
    Case("tiny_decoder_512", "sd1", "tiny_decoder"),
]}
QUICK = ("unet_sd15_512", "text_clip_l", "vae_decoder_512", "tiny_decoder_512")


def build(case: Case, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The part at its real size with random weights, created directly in `dtype` (no second copy), on the CPU."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return _build(case)
    finally:
        torch.set_default_dtype(previous)


def _build(case: Case) -> torch.nn.Module:
    """The part at its real size with random weights, in torch's default dtype."""
    from diffusers import AutoencoderTiny

    if case.part == "vae_decoder":
        return _Decoder(from_shipped_config(case.family, "vae"))
    if case.part == "tiny_decoder":
        return _Decoder(AutoencoderTiny())
    return from_shipped_config(case.family, case.part)


class _Decoder(torch.nn.Module):
    """Only the decoding half of a VAE (what generation runs)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


def inputs(case: Case, *, dtype: torch.dtype, where: str = "cpu") -> dict:
    """Random inputs of the right shapes for one call of the part."""
    side = case.size // 8
    if case.part == "unet":
        args = {"sample": torch.randn(case.batch, 4, side, side),
                "timestep": torch.tensor(500),
                "encoder_hidden_states": torch.randn(case.batch, 77, CONTEXT[case.family])}
        if case.family == "sdxl":
            args["added_cond_kwargs"] = {"text_embeds": torch.randn(case.batch, 1280),
                                         "time_ids": torch.tensor([[case.size, case.size, 0, 0, case.size, case.size]]
                                                                  * case.batch, dtype=torch.float32)}
    elif case.part.startswith("text_encoder"):
        return {"input_ids": torch.randint(0, 49407, (case.batch, 77), device=where)}
    else:
        args = {"latents": torch.randn(1, 4, side, side)}
    return _to(args, dtype=dtype, where=where)


def _to(value, *, dtype: torch.dtype, where: str):
    """Move floating tensors (also inside dicts) to `where` and `dtype`."""
    if isinstance(value, dict):
        return {k: _to(v, dtype=dtype, where=where) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(where, dtype)
    return value.to(where) if isinstance(value, torch.Tensor) else value


def gflop_by_op(case: Case) -> dict[str, float]:
    """GFLOP of one call per operator, counted by FlopCounterMode on the meta device (no memory, no arithmetic)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build(case).eval()
    args = inputs(case, dtype=torch.float32, where="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**args)
    return {str(op): flops / 1e9 for op, flops in counter.get_flop_counts()["Global"].items()}


def count_gflop(case: Case) -> float:
    """GFLOP of one call, counted (not guessed): the sum of `gflop_by_op`."""
    return sum(gflop_by_op(case).values())


def _peak_reset() -> None:
    """Hand freed memory back to the OS and reset the peak-RSS counter (Linux); elsewhere the peak is since start."""
    device.return_free_memory()  # freed blocks of earlier (bigger) models would otherwise count in the next peak
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gib() -> float:
    """Peak resident memory of this process since the last reset, GiB."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@dataclass(frozen=True)
class Timing:
    """Wall times of repeated calls: the median (what to expect) and the best (what the machine reaches)."""

    median: float
    best: float


def seconds(fn: Callable[[], object], *, repeats: int) -> Timing:
    """Median and best wall time of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(median=statistics.median(times), best=min(times))


def _part(case: Case) -> str:
    """Which of sdkit's per-part choices (unet, text_encoder, vae) applies to this case."""
    return device.component_of("vae" if case.part.endswith("decoder") else case.part)


def run(model: torch.nn.Module, case: Case, *, dtype: torch.dtype, where: str, repeats: int) -> tuple[dict, torch.Tensor]:
    """Time one call of `model` as it is (after one warm-up); returns the numbers and its output."""
    torch.manual_seed(0)
    args = inputs(case, dtype=dtype, where=where)
    _peak_reset()

    def call():
        with torch.inference_mode():
            out = model(**args)
        return out[0] if isinstance(out, tuple) else getattr(out, "sample", getattr(out, "last_hidden_state", out))

    elapsed = seconds(call, repeats=repeats)
    output = call().float().cpu()
    return {"dtype": str(dtype).removeprefix("torch."), "seconds": round(elapsed.median, 4),
            "best_seconds": round(elapsed.best, 4), "peak_rss_gib": round(peak_rss_gib(), 2)}, output


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


# GEMM shapes the peak is measured on: square, and the tall-thin kind convolutions and linear layers run as.
GEMM_SHAPES = ((2048, 2048, 2048), (8192, 1024, 1024))


def gemm_peak(*, dtype: str, window: float = 3.0) -> float:
    """This machine's GEMM limit in `dtype`: the best GFLOP/s of matmuls of GEMM_SHAPES repeated for `window` seconds.

    The best, not the median: on shared or throttling CPUs single timings of the same matmul vary several-fold,
    and the limit is what the hardware reaches when nothing gets in the way.
    """
    return max(device.matmul_gflops(dtype=dtype, shape=shape, repeats=1, seconds=window / len(GEMM_SHAPES))
               for shape in GEMM_SHAPES)


def raise_peaks(peaks: dict[str, float], *, window: float = 1.0) -> dict[str, float]:
    """Measure the GEMM peaks again and keep the higher value: over a run, the peak is the best seen at any time."""
    for dtype in peaks:
        peaks[dtype] = round(max(peaks[dtype], gemm_peak(dtype=dtype, window=window)), 1)
    return peaks


def fractions(row: dict, peaks: dict[str, float]) -> dict:
    """A part's best GFLOP/s as a share of the GEMM peaks (best vs best: like with like)."""
    best = row["sdkit"]["best_gflops"]
    return {"fraction_of_bf16_peak": round(best / peaks["bfloat16"], 3),
            "fraction_of_fp32_peak": round(best / peaks["float32"], 3)}


def bench_case(case: Case, *, peaks: dict[str, float], repeats: int, profile: bool = False) -> dict:
    """Both paths of one case: seconds, GFLOP/s, fraction of peak, peak RSS, speed-up and numeric difference
    (and with `profile`, the `breakdown` of sdkit's path by operator kind)."""
    choice = device.choose(device.report())[_part(case)]
    gflop = count_gflop(case)
    model = build(case).eval().requires_grad_(False)
    theirs, reference = run(model, case, dtype=torch.float32, where="cpu", repeats=repeats)
    model = prepare(model, part=_part(case), choice=choice)
    ours, output = run(model, case, dtype=choice.torch_dtype, where=choice.device, repeats=repeats)
    kinds = {"breakdown": breakdown(case, model=model)} if profile else {}
    del model
    for row in (theirs, ours):
        row["gflops"] = round(gflop / row["seconds"], 1)
        row["best_gflops"] = round(gflop / row["best_seconds"], 1)
    return {
        "gflop": round(gflop, 1),
        "default": theirs,
        "sdkit": ours | {"why": describe(part=_part(case), choice=choice)},
        "speedup_vs_default": round(theirs["seconds"] / ours["seconds"], 2),  # median vs median
        **fractions({"sdkit": ours}, peaks),
        "relative_error_vs_fp32": round(relative_error(output, reference), 5),
    } | kinds


# What each profiled operator is, for `breakdown`. Everything else (norms, activations, adds, copies) is "other".
KINDS = {"convolution": ("convolution",), "matmul": ("addmm", "aten::mm", "aten::linear", "_linear_pointwise"),
         "attention": ("scaled_dot_product", "attention", "aten::bmm", "softmax")}


def _kind(op: str) -> str:
    """The kind (convolution, matmul, attention, other) of a profiled operator name."""
    return next((kind for kind, words in KINDS.items() if any(w in op for w in words)), "other")


def _flop_kind(op: str) -> str:
    """The kind of an operator FlopCounterMode counted; on the meta device attention runs as batched matmuls."""
    if "convolution" in op:
        return "convolution"
    if "bmm" in op or "scaled_dot_product" in op:
        return "attention"
    return "matmul" if "mm" in op else "other"


@contextlib.contextmanager
def _quiet_stderr():
    """Hide what C++ code writes to the process's stderr for a moment: PyTorch's CUDA builds, run on a CPU, have
    the profiler print status lines and "gpuGetDeviceCount failed" there, which a notebook would show as output."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def gflop_by_kind(case: Case) -> dict[str, float]:
    """GFLOP of one call by operator kind (KINDS, and "other"), counted on the meta device."""
    gflop = dict.fromkeys((*KINDS, "other"), 0.0)
    for op, amount in gflop_by_op(case).items():
        gflop[_flop_kind(op)] += amount
    return gflop


def profile_kinds(call: Callable[[], object]) -> dict[str, float]:
    """Seconds of one call by operator kind (KINDS, and "other"), the operators' own time in PyTorch's profiler, and
    "between": the rest of the call's wall time (Python and dispatch between operators, and the profiler's own)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        call()
        wall = time.perf_counter() - start
    spent = dict.fromkeys((*KINDS, "other"), 0.0)
    for event in prof.key_averages():
        spent[_kind(event.key)] += event.self_cpu_time_total / 1e6
    return spent | {"between": max(0.0, wall - sum(spent.values()))}


def kind_table(spent: dict[str, float], gflop: dict[str, float]) -> dict:
    """Per kind: seconds, share of the call, GFLOP and GFLOP/s."""
    total = sum(spent.values())
    return {kind: {"seconds": round(spent[kind], 3), "share": round(spent[kind] / total, 3),
                   "gflop": round(gflop.get(kind, 0.0), 3),
                   "gflops": round(gflop[kind] / spent[kind], 1) if spent[kind] and gflop.get(kind) else None}
            for kind in spent}


def breakdown(case: Case, *, model: torch.nn.Module | None = None) -> dict:
    """Where one call of sdkit's path spends its time, by kind of operator: seconds, share, GFLOP and GFLOP/s.

    `model` is the part already on sdkit's path and warmed up (as `bench_case` has it); else one is built.
    """
    choice = device.choose(device.report())[_part(case)]
    args = inputs(case, dtype=choice.torch_dtype, where=choice.device)
    if model is None:  # built outside inference_mode: weights made inside it cannot be packed (sdkit.packing)
        model = prepare(build(case, dtype=choice.torch_dtype), part=_part(case), choice=choice)
        with torch.inference_mode():
            model(**args)  # warm-up (packs the convolution weights)
    with torch.inference_mode():
        spent = profile_kinds(lambda: model(**args))
    return kind_table(spent, gflop_by_kind(case))


@dataclass(frozen=True)
class Run:
    """One end-to-end generation recipe: text encoding, `steps` UNet calls with a real scheduler, decoding."""

    name: str
    family: str
    size: int
    steps: int
    cfg: bool
    decoder: str  # vae_decoder | tiny_decoder
    sampler: str = "euler"


RUNS = {r.name: r for r in [
    Run("sd15_512_20steps_cfg", "sd1", 512, 20, True, "vae_decoder"),
    Run("sd15_512_lcm_4steps_tiny", "sd1", 512, 4, False, "tiny_decoder", "lcm"),
    Run("sd21_turbo_512_1step_tiny", "sd2", 512, 1, False, "tiny_decoder", "euler_a"),
    Run("sdxl_1024_4steps", "sdxl", 1024, 4, False, "vae_decoder", "euler"),
]}
QUICK_RUNS = ("sd15_512_lcm_4steps_tiny",)


def end_to_end(recipe: Run) -> dict:
    """Seconds and peak RSS of one whole generation on sdkit's path (random weights, real sizes and scheduler)."""
    from sdkit.generate import GenerationSettings, make_scheduler

    choices = device.choose(device.report())
    _peak_reset()
    encoders = ["text_encoder", "text_encoder_2"] if recipe.family == "sdxl" else ["text_encoder"]
    texts = [prepare(build(Case("t", recipe.family, e), dtype=choices["text_encoder"].torch_dtype),
                     part="text_encoder", choice=choices["text_encoder"]) for e in encoders]
    unet_case = Case("u", recipe.family, "unet", recipe.size, 2 if recipe.cfg else 1)
    unet = prepare(build(unet_case, dtype=choices["unet"].torch_dtype), part="unet", choice=choices["unet"])
    decoder_case = Case("d", recipe.family, recipe.decoder, recipe.size)
    decoder = prepare(build(decoder_case, dtype=choices["vae"].torch_dtype), part="vae", choice=choices["vae"])
    scheduler = make_scheduler(json.loads((CONFIGS / recipe.family / "scheduler" / "scheduler_config.json").read_text()),
                               GenerationSettings(sampler=recipe.sampler, steps=recipe.steps))
    torch.manual_seed(0)
    ids = torch.randint(0, 49407, (unet_case.batch, 77))  # prompt and negative prompt when CFG is on
    unet_args = inputs(unet_case, dtype=choices["unet"].torch_dtype, where=choices["unet"].device)
    loaded = peak_rss_gib()

    def generate_once() -> torch.Tensor:
        with torch.inference_mode():
            for text in texts:
                text(input_ids=ids.to(choices["text_encoder"].device))
            scheduler.set_timesteps(recipe.steps)
            latents = torch.randn(1, 4, recipe.size // 8, recipe.size // 8) * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                x = scheduler.scale_model_input(torch.cat([latents] * unet_case.batch), t)
                eps = unet(**(unet_args | {"sample": x.to(unet_args["sample"]), "timestep": t})).sample.float()
                eps = eps[:1] + 7.0 * (eps[1:] - eps[:1]) if recipe.cfg else eps
                latents = scheduler.step(eps, t, latents).prev_sample
            trim_heap()  # as vae.decode does before decoding
            return decoder(latents=latents.to(choices["vae"].device, choices["vae"].torch_dtype))

    elapsed = seconds(generate_once, repeats=1).median
    return {"seconds": round(elapsed, 3), "steps": recipe.steps, "cfg": recipe.cfg, "decoder": recipe.decoder,
            "size": recipe.size, "peak_rss_gib": round(peak_rss_gib(), 2), "rss_after_load_gib": round(loaded, 2)}


def slider_latency(*, moves: int = 5, model: str = "shapes-v1") -> dict:
    """Seconds from a slider change to the new picture handed to the panel's image, with and without live preview.

    The panel runs as in a notebook (auto-run, its debounce, the worker thread), without a browser; the browser's
    own drawing adds a few milliseconds. Moves alternate between preview on and off, so both see the same machine.
    """
    from sdkit import widgets
    from sdkit.generate import GenerationSettings

    panel = widgets.Panel(model, auto_run=True, settings=GenerationSettings(
        prompt="a red circle on a white background", seed=1, steps=20, width=64, height=64))
    panel.generate(wait=True)  # load the model and fit the preview map: the first run is not a slider move
    times: dict[bool, list[float]] = {True: [], False: []}
    for move in range(2 * moves):
        preview = move % 2 == 0
        panel.preview.value = preview
        started = time.perf_counter()
        panel.controls["cfg"].value = 6.0 + move % 4  # a new value every move
        panel.wait()
        if "Done" not in panel.status.value:
            raise RuntimeError(f"the panel did not finish a run: {panel.status.value}")
        times[preview].append(panel.last_shown_at - started)
    summary = {"with_preview" if on else "without_preview": {"median_s": round(statistics.median(t), 3),
                                                               "best_s": round(min(t), 3), "moves": len(t)}
               for on, t in times.items()}
    return summary | {"model": model, "steps": 20, "size": 64, "debounce_s": widgets.DEBOUNCE_S}


def lora_apply(*, rank: int = 32) -> dict:
    """Seconds to merge a LoRA into the real-size SD1.5 UNet and text encoder, to move its weight (a slider), and to
    take it off; random weights in sdkit's dtype, rank `rank` on every linear layer of the transformer blocks."""
    import tempfile

    from sdkit import loras
    from sdkit.testing import write_lora

    choice = device.choose(device.report())["unet"]
    pipe = real_size_pipeline("sd1", dtype=choice.torch_dtype)
    with tempfile.TemporaryDirectory(prefix="sdkit-bench-") as folder:
        path = Path(folder) / "bench-lora.safetensors"
        write_lora(pipe, path, rank=rank, every_linear=True, scale=0.01)
        lora = loras.load(path)
        size = path.stat().st_size / 2**20
    timings = {}
    for step, weight in (("apply_s", 1.0), ("move_weight_s", 0.5), ("remove_s", None)):
        started = time.perf_counter()
        loras.apply(pipe, [] if weight is None else [(lora, weight)])
        timings[step] = round(time.perf_counter() - started, 3)
    return timings | {"layers": len(lora.layers), "rank": rank, "file_mib": round(size, 1),
                      "dtype": str(choice.torch_dtype).removeprefix("torch.")}


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio of two 8-bit images, dB (inf when identical)."""
    import numpy as np

    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def quality(*, prompts: tuple[str, ...] = ("a red circle on a white background", "a blue triangle on a black background",
                                            "a yellow square on a black background")) -> dict:
    """sdkit's path vs fp32 on the trained shapes-v1 model, same seeds: latent relative error and decoded PSNR."""
    import os

    from sdkit import checkpoints
    from sdkit.vae import decode

    def pipeline(dtype: str | None):
        previous = os.environ.pop("SDKIT_DTYPE", None)
        if dtype:
            os.environ["SDKIT_DTYPE"] = dtype
        try:
            return checkpoints.load("shapes-v1")
        finally:
            os.environ.pop("SDKIT_DTYPE", None)
            if previous is not None:
                os.environ["SDKIT_DTYPE"] = previous

    def latents_and_images(pipe):
        out = []
        for prompt in prompts:
            generator = torch.Generator().manual_seed(0)
            with torch.inference_mode():
                lat = pipe(prompt=prompt, num_inference_steps=20, guidance_scale=7.0, width=64, height=64,
                           generator=generator, output_type="latent").images
            out.append((lat.float(), decode(pipe, lat)[0]))
        return out

    fp32 = pipeline("float32")
    reference = latents_and_images(fp32)
    ours_pipe = pipeline(None)
    ours = latents_and_images(ours_pipe)
    return {"model": "shapes-v1 (trained weights), 20 steps, CFG 7, euler",
            "dtypes": {k: c.dtype for k, c in device.choose(device.report()).items()},
            "latent_relative_error": round(max(relative_error(o[0], r[0]) for o, r in zip(ours, reference)), 5),
            "psnr_db": round(min(psnr(o[1], r[1]) for o, r in zip(ours, reference)), 2),
            # the decoder alone: fp32 latents decoded by sdkit's VAE vs the fp32 VAE
            "vae_psnr_db": round(min(psnr(decode(ours_pipe, r[0])[0], r[1]) for r in reference), 2)}


FULL = dict(steps=20, cfg=7.0, sampler="euler_a")  # the course's default run, which fast mode is measured against


def fast_mode(*, size: int = 512, repeats: int = 1, progress: bool = False) -> dict:
    """Fast mode's speed and what it costs: seconds of one image on the real-size SD1.5 (random weights, this
    machine's path) with the full path and with fast mode, interleaved; quality on the trained shapes-v1 model."""
    from sdkit import checkpoints, fast
    from sdkit.generate import GenerationSettings, generate

    choice = device.choose(device.report())["unet"]
    pipe = real_size_pipeline("sd1", dtype=choice.torch_dtype)
    pipe.set_progress_bar_config(disable=True)  # generate() has its own bar
    for part in ("unet", "vae", "text_encoder"):
        setattr(pipe, part, prepare(getattr(pipe, part), part=device.component_of(part), choice=choice))
    full = GenerationSettings(prompt="a sheep in a field, photo", negative_prompt="blurry", seed=1, width=size,
                              height=size, **FULL)
    runs = {"full": full, "fast": fast.apply(full)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, settings in runs.items():
            started = time.perf_counter()
            generate(pipe, settings, progress=progress)
            times[name].append(time.perf_counter() - started)
    merging = token_merging_steps(pipe.unet, sizes=(size, 2 * size), ratio=fast.FAST["token_merging"],
                                  rounds=max(3, repeats))
    del pipe
    device.return_free_memory()
    seconds = {name: round(statistics.median(t), 2) for name, t in times.items()}
    return {"size": size, "full": _run_text(full), "fast": _run_text(runs["fast"]),
            "seconds": seconds, "speedup": round(seconds["full"] / seconds["fast"], 2),
            "token_merging": merging, "quality": fast_quality(checkpoints.load("shapes-v1"))}


def token_merging_steps(unet, *, sizes: tuple[int, ...], ratio: float, rounds: int = 3) -> list[dict]:
    """Seconds of one UNet step with CFG (batch 2) with and without token merging at each picture size, interleaved
    round by round (medians): merging pays more the larger the picture, as attention grows with tokens squared."""
    from sdkit import tome

    rows = []
    context = torch.randn(2, 77, unet.config.cross_attention_dim, dtype=unet.dtype)
    for size in sizes:
        latent = torch.randn(2, unet.config.in_channels, size // 8, size // 8, dtype=unet.dtype)
        times: dict[float, list[float]] = {0.0: [], ratio: []}
        with torch.inference_mode():
            unet(latent, 500, context)  # the first call at a new size allocates; not timed
            for _ in range(rounds):
                for merge in times:
                    with tome.token_merging(unet, ratio=merge):
                        started = time.perf_counter()
                        unet(latent, 500, context)
                        times[merge].append(time.perf_counter() - started)
        off, on = (statistics.median(times[merge]) for merge in (0.0, ratio))
        rows.append({"size": size, "ratio": ratio, "seconds_off": round(off, 3), "seconds_on": round(on, 3),
                     "speedup": round(off / on, 2), "rounds": rounds})
    return rows


def _run_text(settings) -> str:
    """A run's steps, sampler and fast-mode trades in words."""
    from sdkit import fast

    trades = fast.describe_run(settings)
    return f"{settings.steps} steps {settings.sampler} {settings.scheduler}, CFG {settings.cfg:g}" + (
        f"; {trades}" if trades else "")


def fast_quality(pipe, *, seeds: int = 2) -> dict:
    """Fast mode against the full path on shapes-v1: the detector's accuracy on every full caption x `seeds`, and
    the PSNR / SSIM of each fast picture against the full picture of the same prompt and seed."""
    from sdkit import fast, quality
    from sdkit.generate import generate
    from sdkit.shapes import data
    from sdkit.shapes.evaluate import DEFAULTS, evaluate

    full = DEFAULTS.replace(**FULL)
    quick = fast.apply(full)
    scores = {name: evaluate(pipe, seeds=seeds, vague_seeds=0, settings=s, progress=False)
              for name, s in (("full", full), ("fast", quick))}
    psnrs, ssims = [], []
    for prompt in data.full_captions()[::4]:
        a = generate(pipe, full.replace(prompt=prompt, seed=0), progress=False)[0]
        b = generate(pipe, quick.replace(prompt=prompt, seed=0), progress=False)[0]
        psnrs.append(quality.psnr(a, b))
        ssims.append(quality.ssim(a, b))
    return {"model": "shapes-v1", "images": scores["full"]["images"],
            "accuracy": {name: round(score["accuracy"]["all"], 3) for name, score in scores.items()},
            "seconds_per_image": {name: round(score["seconds_per_image"], 3) for name, score in scores.items()},
            "psnr_db": round(statistics.median(psnrs), 1), "ssim": round(statistics.median(ssims), 3),
            "pairs": len(psnrs)}


def real_size_pipeline(family: str, *, dtype: torch.dtype = torch.float16):
    """A diffusers pipeline of `family` at its real size, from the shipped configs, with random weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from sdkit.checkpoints import _tokenizer

    parts = {"unet": build(Case("u", family, "unet"), dtype=dtype),
             "vae": build(Case("v", family, "vae_decoder"), dtype=dtype).vae,
             "text_encoder": build(Case("t", family, "text_encoder"), dtype=dtype),
             "tokenizer": _tokenizer("open_clip" if family == "sd2" else "clip_l"),
             "scheduler": EulerDiscreteScheduler.from_pretrained(CONFIGS / family, subfolder="scheduler")}
    if family == "sdxl":
        parts |= {"text_encoder_2": build(Case("t2", family, "text_encoder_2"), dtype=dtype),
                  "tokenizer_2": _tokenizer("open_clip")}
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


_LOAD = """
import json, sys
from sdkit import bench, checkpoints
pipe = checkpoints.load(sys.argv[1])
print(json.dumps({"peak_rss_gib": bench.peak_rss_gib(), "dtypes": pipe.sdkit.dtypes}))
"""


def load_memory(family: str, *, folder: Path) -> dict:
    """Peak RSS of `checkpoints.load` on a real-size random fp16 file of `family` (as civitai serves), in a new process."""
    import subprocess
    import sys

    from sdkit.convert import save_single_file

    path = folder / f"random-{family}.safetensors"
    pipe = real_size_pipeline(family)
    save_single_file(pipe, path, family=family, metadata={"modelspec.title": f"random {family} (sdkit bench)"},
                     dtype=torch.float16)
    del pipe
    gc.collect()
    done = subprocess.run([sys.executable, "-c", _LOAD, str(path)], capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    size = path.stat().st_size / 2**30
    path.unlink()
    return {"file_gib": round(size, 3), "dtypes": loaded["dtypes"], "peak_rss_gib": round(loaded["peak_rss_gib"], 2)}


_DECODE = """
import json, sys, time, torch
from sdkit import bench, device
from sdkit.checkpoints import from_shipped_config
from sdkit.vae import _run
size, tiled, family = int(sys.argv[1]), sys.argv[2] == "tiled", sys.argv[3]
dtype = device.choose(device.report())["vae"].torch_dtype
torch.manual_seed(0)
vae = from_shipped_config(family, "vae").to(dtype).eval()
factor = 2 ** (len(vae.config.block_out_channels) - 1)
latents = torch.randn(1, vae.config.latent_channels, size // factor, size // factor, dtype=dtype)
bench._peak_reset()
start = time.perf_counter()
with torch.inference_mode():
    pixels = _run(vae, latents, tiled=tiled)
print(json.dumps({"seconds": round(time.perf_counter() - start, 2), "peak_rss_gib": round(bench.peak_rss_gib(), 2),
                  "dtype": str(dtype).removeprefix("torch."), "finite": bool(torch.isfinite(pixels).all())}))
"""


def vae_memory(*, sizes: tuple[int, ...] = (1024, 2048), family: str = "sd1") -> dict:
    """Peak RSS and seconds of one VAE decode (the family's shipped VAE config, SD1.5 by default, random weights,
    this machine's dtype), whole and tiled, each in a new process so one's peak does not hide the next."""
    return {f"{size}_{how}": _in_new_process(_DECODE, size, how, family) for size in sizes for how in ("whole", "tiled")}


def _in_new_process(script: str, *args: object, env: dict[str, str] | None = None) -> dict:
    """Run a measuring script in a fresh Python (so its peak memory is its own); its last printed line, as JSON, or
    the error it ended with."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["killed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


_UPSCALE = """
import json, sys, tempfile, time, torch
from pathlib import Path
from PIL import Image
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact
from sdkit import bench, upscale
size, how, tile, features, convs = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "random-compact.safetensors"
    save_file(Compact(num_feat=features, num_conv=convs, upscale=4).state_dict(), str(path))
    model = upscale.load(path)
picture = Image.effect_noise((size, size), 64).convert("RGB")
bench._peak_reset()
start = time.perf_counter()
big = upscale.upscale(model, picture, tile=tile, progress=False)
print(json.dumps({"seconds": round(time.perf_counter() - start, 2), "peak_rss_gib": round(bench.peak_rss_gib(), 2),
                  "dtype": str(model.model.dtype).removeprefix("torch."), "out": list(big.size),
                  "tiles": upscale.tile_count(size, size, tile=tile)}))
"""
# Real-ESRGAN's realesr-general-x4v3 (compact, 64 features x 32 convolutions), random weights: its real cost.
UPSCALER_SHAPE = (64, 32)


def upscale_memory(*, sizes: tuple[int, ...] = (1024,), shape: tuple[int, int] = UPSCALER_SHAPE, tile: int = 512) -> dict:
    """Peak RSS and seconds of a 4x upscale (Real-ESRGAN compact at realesr-general-x4v3's size, random weights,
    this machine's dtype), in 512 px tiles and in one piece, each in a new process."""
    return {f"{size}_{how}": _in_new_process(_UPSCALE, size, how, tile if how == "tiled" else size, *shape)
            for size in sizes for how in ("tiled", "whole")}


def sd15_step(*, size: int, model: str = "sd1") -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """SD1.5's UNet on this machine's path (random weights; model="level": its first level only, a quick stand-in
    for tests) and the (sample, timestep, context) of one CFG step at `size`."""
    from sdkit import speed
    from sdkit.optimize import memory_format

    choice = device.choose(device.report())["unet"]
    torch.manual_seed(0)
    unet = prepare(from_shipped_config("sd1", "unet") if model == "sd1" else speed._level(), part="unet", choice=choice)
    layout = memory_format(part="unet", choice=choice)
    sample = torch.randn(2, 4, size // 8, size // 8, dtype=choice.torch_dtype).contiguous(memory_format=layout)
    return unet, (sample, torch.tensor([500.0]), torch.randn(2, 77, 768, dtype=choice.torch_dtype))


_STEP = """
import json, resource, statistics, sys, threading, time, torch
from sdkit import allocator, bench, device
size, steps, model = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
choice = device.choose(device.report())["unet"]
unet, (sample, t, context) = bench.sd15_step(size=size, model=model)
rows = []
def run():  # in a worker thread, as the panel runs a picture
    with torch.inference_mode():
        unet(sample, t, context)
        for _ in range(steps):
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            unet(sample, t, context)
            after = resource.getrusage(resource.RUSAGE_SELF)
            rows.append((time.perf_counter() - start, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
bench._peak_reset()
worker = threading.Thread(target=run)
worker.start(); worker.join()
print(json.dumps({"seconds": [round(r[0], 3) for r in rows], "page_faults": round(statistics.median(r[1] for r in rows)),
                  "system_seconds": round(statistics.median(r[2] for r in rows), 3), "peak_rss_gib": round(bench.peak_rss_gib(), 2),
                  "dtype": str(choice.torch_dtype).removeprefix("torch."), "layout": choice.layout,
                  "tunables": allocator.in_effect(), "faults_each": [r[1] for r in rows]}))
"""


def allocator(*, size: int = 512, rounds: int = 3, steps: int = 2, model: str = "sd1", progress: bool = True) -> dict:
    """One SD1.5 UNet CFG step (random weights, this machine's dtype and layout; model="level": its first level only)
    in a worker thread, in new processes that alternate glibc's malloc defaults and sdkit's tunables (sdkit.allocator):
    seconds, page faults and system seconds per step, peak RSS."""
    from tqdm.auto import tqdm

    from sdkit import allocator as tunables

    plain = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", tunables.OPT_OUT)}
    envs = {"glibc_defaults": plain, "sdkit_tunables": tunables.environment(plain)}
    runs: dict[str, list[dict]] = {name: [] for name in envs}
    with tqdm(total=rounds * len(envs), desc="allocator", disable=not progress) as bar:
        for _ in range(rounds):
            for name, env in envs.items():
                runs[name].append(_in_new_process(_STEP, size, steps, model, env=env))
                bar.update()
    result: dict = {"size": size, "rounds": rounds, "steps_per_round": steps}
    for name, found in runs.items():
        if any("error" in r for r in found):
            result[name] = {"error": next(r["error"] for r in found if "error" in r)}
            continue
        result[name] = {"step_seconds_median": round(statistics.median(s for r in found for s in r["seconds"]), 3),
                        "step_seconds": [s for r in found for s in r["seconds"]],
                        "page_faults_per_step": round(statistics.median(r["page_faults"] for r in found)),
                        "system_seconds_per_step": round(statistics.median(r["system_seconds"] for r in found), 3),
                        "page_faults_each_step": [f for r in found for f in r["faults_each"]],
                        "peak_rss_gib_largest": max(r["peak_rss_gib"] for r in found), "dtype": found[0]["dtype"],
                        "layout": found[0]["layout"], "tunables_active": found[0]["tunables"]}
    return result


def packing(*, size: int = 512, rounds: int = 6, model: str = "sd1", progress: bool = True) -> dict:
    """One SD1.5 UNet CFG step (random weights, this machine's dtype and layout; model="level": its first level only)
    three ways, in turn in one process (in reverse order every other round): plain, with its convolutions on packed
    weights (sdkit.packing), and packed with fused blocks (sdkit.fusion). Seconds each round, the rounds' paired
    ratios (plain over packed, packed over fused) and the GiB the packed copies take."""
    from tqdm.auto import tqdm

    from sdkit import fusion
    from sdkit import packing as packed

    choice = device.choose(device.report())["unet"]
    unet, (sample, t, context) = sd15_step(size=size, model=model)
    fusion.unfuse(unet)
    seconds: dict[str, list[float]] = {"plain": [], "packed": [], "fused": []}
    switch = {"plain": lambda m: (fusion.unfuse(m), packed.unpack(m, free=False)),  # the copies kept between rounds
              "packed": lambda m: (fusion.unfuse(m), packed.pack(m)),
              "fused": lambda m: (packed.pack(m), fusion.fuse(m))}
    with torch.inference_mode(), tqdm(total=len(seconds) * rounds, desc="packing", disable=not progress) as bar:
        for way in seconds:  # warm-up: every way's kernels picked, the packed copies made
            switch[way](unet)
            unet(sample, t, context)
        for round_ in range(rounds):
            for way in list(seconds)[::1 if round_ % 2 == 0 else -1]:  # in reverse every other round: no way always first
                switch[way](unet)
                start = time.perf_counter()
                unet(sample, t, context)
                seconds[way].append(round(time.perf_counter() - start, 3))
                bar.update()
    ratios = {f"{a}_over_{b}": [round(x / y, 3) for x, y in zip(seconds[a], seconds[b])]
              for a, b in (("plain", "packed"), ("packed", "fused"))}
    return {"size": size, "rounds": rounds, "dtype": choice.dtype, "layout": choice.layout, "seconds": seconds,
            "median_seconds": {way: round(statistics.median(s), 3) for way, s in seconds.items()},
            "ratios": ratios, "median_ratios": {k: round(statistics.median(r), 3) for k, r in ratios.items()},
            "faster_rounds": {k: sum(x > 1 for x in r) for k, r in ratios.items()},
            "packed_gib": round(packed.packed_gib(unet), 2)}


def format_packing(result: dict) -> str:
    """The three ways' medians, and each step's round-by-round ratio."""
    m = result["median_seconds"]
    lines = [f"SD1.5 UNet CFG step at {result['size']}² ({result['dtype']}, {result['layout']}), {result['rounds']} rounds "
             f"in turn:", f"median {m['plain']:.2f} s plain, {m['packed']:.2f} s with packed convolution weights "
             f"(+{result['packed_gib']:.2f} GiB), {m['fused']:.2f} s packed and fused"]
    for name, ratios in result["ratios"].items():
        a, b = name.split("_over_")
        lines.append(f"round by round, {a} over {b}: median {result['median_ratios'][name]:.3f}x; {b} faster in "
                     f"{result['faster_rounds'][name]} of {result['rounds']} ({', '.join(f'{r:.2f}' for r in ratios)})")
    return "\n".join(lines)


def format_allocator(result: dict) -> str:
    """The allocator comparison as a small table."""
    lines = [f"SD1.5 UNet CFG step at {result['size']}² in a worker thread, {result['rounds']} processes each way:",
             f"{'malloc':<16} {'median step':>12} {'page faults':>12} {'system s':>9} {'peak RSS':>9}"]
    for name in ("glibc_defaults", "sdkit_tunables"):
        row = result[name]
        if "error" in row:
            lines.append(f"{name:<16} failed: {row['error']}")
            continue
        lines.append(f"{name:<16} {row['step_seconds_median']:>10.2f} s {row['page_faults_per_step']:>12,} "
                     f"{row['system_seconds_per_step']:>7.2f} s {row['peak_rss_gib_largest']:>5.2f} GiB  "
                     f"({row['dtype']}, {row['layout']})")
    return "\n".join(lines)


def bench(*, quick: bool = False, progress: bool = True) -> dict:
    """Run the benchmark: GEMM peaks, every part on both paths, end-to-end recipes, cost growth, numeric quality."""
    from tqdm.auto import tqdm

    report = device.report()
    from sdkit import allocator as tunables

    result: dict = {"machine": {"cpu": report.cpu, "cores": report.cores, "threads": torch.get_num_threads(),
                                "isa": report.isa, "accelerator": report.accelerator, "torch": report.torch_version,
                                "malloc_tunables": tunables.in_effect()},
                    "quick": quick}
    peaks = {dtype: round(gemm_peak(dtype=dtype, window=1.0 if quick else 5.0), 1) for dtype in ("float32", "bfloat16")}
    names = QUICK if quick else tuple(CASES)
    for name in tqdm(names, desc="parts", disable=not progress):
        result[name] = bench_case(CASES[name], peaks=peaks, repeats=1 if quick else 3, profile=name == "unet_sd15_512")
        raise_peaks(peaks, window=0.5 if quick else 2.0)  # a slow spell at the start must not lower the peak
    result["gemm_peak_gflops"] = peaks
    for name in names:
        result[name] |= fractions(result[name], peaks)
    growth = [n for n in names if n.startswith("unet_sd15_")]
    if len(growth) > 1:
        base = result["unet_sd15_512"]
        result["growth_sd15"] = [{"size": CASES[n].size, "gflop": result[n]["gflop"],
                                  "seconds": result[n]["sdkit"]["seconds"],
                                  "cost_vs_512": round(result[n]["sdkit"]["seconds"] / base["sdkit"]["seconds"], 2)}
                                 for n in sorted(growth, key=lambda n: CASES[n].size)]
    runs = QUICK_RUNS if quick else tuple(RUNS)
    result["end_to_end"] = {n: end_to_end(RUNS[n]) for n in tqdm(runs, desc="end to end", disable=not progress)}
    if not quick:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="sdkit-bench-") as folder:
            result["load"] = {family: load_memory(family, folder=Path(folder))
                              for family in tqdm(("sd1", "sdxl"), desc="loads", disable=not progress)}
        result["vae_memory"] = vae_memory()
        result["upscale_memory"] = upscale_memory()
        result["fast_mode"] = fast_mode()
    result["quality"] = quality()
    result["widgets"] = slider_latency()
    result["lora"] = lora_apply()
    return result


def format_table(result: dict) -> str:
    """The benchmark as a text table."""
    m, peaks = result["machine"], result["gemm_peak_gflops"]
    lines = [f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads, {', '.join(m['isa'])}, torch {m['torch']}",
             f"GEMM peak: fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s", "",
             f"{'part':<18} {'GFLOP':>7} {'default s':>10} {'sdkit s':>8} {'speed-up':>8} {'% bf16 peak':>11} "
             f"{'RSS GiB':>8} {'rel. err':>8}"]
    for name, row in result.items():
        if isinstance(row, dict) and "speedup_vs_default" in row:
            lines.append(f"{name:<18} {row['gflop']:>7.0f} {row['default']['seconds']:>10.3f} "
                         f"{row['sdkit']['seconds']:>8.3f} {row['speedup_vs_default']:>7.2f}x "
                         f"{row['fraction_of_bf16_peak']:>10.0%} {row['sdkit']['peak_rss_gib']:>8.2f} "
                         f"{row['relative_error_vs_fp32']:>8.4f}")
    for kind, row in result.get("unet_sd15_512", {}).get("breakdown", {}).items():
        rate = f" at {row['gflops']:.0f} GFLOP/s" if row["gflops"] else ""
        lines.append(f"SD1.5 UNet step, {kind:<11} {row['share']:>4.0%} of the time: {row['seconds']:.2f} s, "
                     f"{row['gflop']:.0f} GFLOP{rate}")
    for row in result.get("growth_sd15", []):
        lines.append(f"SD1.5 UNet step at {row['size']}²: {row['seconds']:.2f} s ({row['cost_vs_512']:.2f}x the 512² cost)")
    lines.append("")
    for name, row in result["end_to_end"].items():
        lines.append(f"end to end {name:<28} {row['seconds']:>7.2f} s, peak RSS {row['peak_rss_gib']:.2f} GiB")
    for family, row in result.get("load", {}).items():
        lines.append(f"load {family} ({row['file_gib']:.1f} GiB fp16 file): peak RSS {row['peak_rss_gib']:.2f} GiB")
    for name, row in result.get("vae_memory", {}).items():
        size, how = name.split("_")
        lines.append(f"VAE decode {size}² {how}: " + (f"did not run ({row['error']})" if "error" in row else
                     f"{row['seconds']:.1f} s, peak RSS {row['peak_rss_gib']:.2f} GiB ({row['dtype']})"))
    for name, row in result.get("upscale_memory", {}).items():
        size, how = name.split("_")
        lines.append(f"4x upscale {size}² {how} (Real-ESRGAN compact 64x32): " + (
            f"did not run ({row['error']})" if "error" in row else
            f"{row['seconds']:.1f} s, peak RSS {row['peak_rss_gib']:.2f} GiB, {row['tiles']} tiles ({row['dtype']})"))
    if "widgets" in result:
        ui = result["widgets"]
        lines.append(f"widgets: slider move -> new {ui['model']} picture ({ui['steps']} steps, {ui['size']} px): "
                     f"{ui['with_preview']['median_s']:.2f} s with live preview, "
                     f"{ui['without_preview']['median_s']:.2f} s without (median of {ui['with_preview']['moves']})")
    if "lora" in result:
        lo = result["lora"]
        lines.append(f"LoRA on SD1.5 ({lo['layers']} layers, rank {lo['rank']}, {lo['file_mib']:.0f} MiB, {lo['dtype']}): "
                     f"apply {lo['apply_s']:.2f} s, move its weight {lo['move_weight_s']:.2f} s, "
                     f"remove {lo['remove_s']:.2f} s")
    if "fast_mode" in result:
        lines += format_fast(result["fast_mode"]).splitlines()
    q = result["quality"]
    alone = f" (decoder alone: {q['vae_psnr_db']:.1f} dB)" if "vae_psnr_db" in q else ""
    lines.append(f"numeric check ({q['model']}): latent relative error {q['latent_relative_error']:.4f}, "
                 f"PSNR {q['psnr_db']:.1f} dB vs fp32{alone}")
    return "\n".join(lines)


def format_fast(row: dict) -> str:
    """Fast mode's measurement as text lines."""
    q = row["quality"]
    return "\n".join([
        f"fast mode, SD1.5 {row['size']}² (random weights): {row['seconds']['full']:.1f} s -> "
        f"{row['seconds']['fast']:.1f} s per image ({row['speedup']:.2f}x)",
        f"  full: {row['full']}",
        f"  fast: {row['fast']}",
        *(f"  token merging {m['ratio']:.0%} alone, UNet step with CFG at {m['size']}²: {m['seconds_off']:.2f} s -> "
          f"{m['seconds_on']:.2f} s ({m['speedup']:.2f}x, median of {m['rounds']})" for m in row.get("token_merging", [])),
        f"  cost on {q['model']} ({q['images']} images each): detector all-right {q['accuracy']['full']:.0%} full vs "
        f"{q['accuracy']['fast']:.0%} fast; fast vs full picture, same seed: PSNR {q['psnr_db']:.1f} dB, "
        f"SSIM {q['ssim']:.3f} (median of {q['pairs']})"])
