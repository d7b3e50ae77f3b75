"""GenerationSettings -> images: samplers by their common names, progress, cancel."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

from sdkit import fast, openvino_unet
from sdkit.errors import SdkitError
from sdkit.tome import token_merging

SIZE_MIN, SIZE_MAX = 8, 4096


@dataclass
class GenerationSettings:
    """Everything that decides an image, with A1111's meanings."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "euler_a"
    scheduler: str = "normal"
    width: int = 512
    height: int = 512
    batch_size: int = 1
    clip_skip: int = 1
    model: str = ""
    strength: float = 0.75  # A1111's "Denoising strength": how much of an init image or hires pass is redrawn
    init_image: str = ""  # img2img: the picture (a path) to start from, resized to width x height; "" = from noise
    hires_scale: float = 1.0  # A1111's "Hires upscale": above 1, a second pass at the larger size
    hires_steps: int = 0  # A1111's "Hires steps": 0 = as many as `steps`
    hires_upscaler: str = "Latent"  # how the first picture is enlarged before the hires pass
    controlnets: tuple = ()  # sdkit.controlnet.Unit: each a ControlNet, its control image, weight and start/end
    deep_cache: int = 1  # fast mode (sdkit.fast): the UNet's deep blocks run every N steps, reused between; 1 = off
    cfg_until: float = 1.0  # fast mode: CFG (the negative prompt's pass) only for this share of the steps; 1 = all
    token_merging: float = 0.0  # A1111's "Token merging ratio" (sdkit.tome): share of self-attention tokens merged
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.sampler.endswith("_karras"):
            self.sampler, self.scheduler = self.sampler[: -len("_karras")], "karras"

    def hires_size(self) -> tuple[int, int]:
        """Width and height of the hires pass (multiples of 8)."""
        return (round(self.width * self.hires_scale / 8) * 8, round(self.height * self.hires_scale / 8) * 8)

    def replace(self, **changes: object) -> "GenerationSettings":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """Raise a clear error for a setting no model can run."""
        self._check_numbers()
        for name in ("width", "height"):
            value = getattr(self, name)
            if value % 8 or not SIZE_MIN <= value <= SIZE_MAX:
                raise SdkitError(
                    f"{name}={value} is not usable: it must be a multiple of 8 between {SIZE_MIN} and {SIZE_MAX}.",
                    fix=f"use {name}={max(SIZE_MIN, min(SIZE_MAX, round(value / 8) * 8))}",
                )
        if self.steps < 1:
            raise SdkitError(f"steps={self.steps} is not usable: at least 1 step is needed.", fix="use steps=20")
        if not -1 <= self.seed < 2**32:
            raise SdkitError(f"seed={self.seed} is out of range: seeds run from 0 to 4294967295 (-1 = random).",
                             fix=f"use seed={self.seed % 2**32}")
        if self.batch_size < 1:
            raise SdkitError(f"batch_size={self.batch_size} is not usable: at least 1.", fix="use batch_size=1")
        if self.clip_skip < 1:
            raise SdkitError(f"clip_skip={self.clip_skip} is not usable: 1 means the last layer.", fix="use clip_skip=1")
        if not 0 < self.strength <= 1:
            raise SdkitError(f"strength={self.strength} is not usable: the denoising strength runs from 0 (keep the "
                             f"picture) to 1 (redraw it all).", fix="use strength=0.75 (A1111's default)")
        if not 1 <= self.hires_scale <= 4:
            raise SdkitError(f"hires_scale={self.hires_scale} is not usable: A1111's Hires upscale runs from 1 to 4.",
                             fix="use hires_scale=2 for a hires pass, or 1 for none")
        if self.deep_cache < 1:
            raise SdkitError(f"deep_cache={self.deep_cache} is not usable: 1 runs the whole UNet every step, N its "
                             f"deep blocks every N steps.", fix="use deep_cache=1 (off) or 3 (fast mode)")
        if self.hires_steps < 0:
            raise SdkitError(f"hires_steps={self.hires_steps} is not usable.", fix="use 0 (as many as steps) or more")
        for name, on, steps in (("img2img", bool(self.init_image), self.steps),
                                ("hires", self.hires_scale > 1, self.hires_steps or self.steps)):
            if on and int(steps * self.strength) < 1:  # diffusers and A1111 redraw int(steps x strength) steps
                raise SdkitError(f"the {name} pass would redraw int({steps} steps x strength {self.strength:g}) = 0 "
                                 f"steps.", fix=f"use strength {math.ceil(100 / steps) / 100:g} or more, or more steps")
        if not self.hires_upscaler.strip() or "\n" in self.hires_upscaler:
            raise SdkitError(f"Hires upscaler {self.hires_upscaler!r} is not a name.",
                             fix=f"use one of {', '.join(HIRES_UPSCALERS)} or an upscale model's name")
        if self.hires_scale > 1:
            for name in ("width", "height"):
                target = self.hires_size()[name == "height"]
                if target > SIZE_MAX:
                    raise SdkitError(f"the hires {name} {target} is over {SIZE_MAX}.", fix="use a smaller hires_scale")
        for index, unit in enumerate(self.controlnets):
            unit.check(index)
        if self.scheduler not in SCHEDULES:
            raise SdkitError(f"Schedule type {self.scheduler!r} has no diffusers equivalent here; sdkit runs: "
                             f"{', '.join(SCHEDULES)}.", fix="use scheduler='normal' (A1111's Automatic) or one of those")


    def _check_numbers(self) -> None:
        """Whole numbers where counts are meant, finite numbers elsewhere, and no count beyond reason."""
        for name, most in WHOLE_NUMBERS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SdkitError(f"{name}={value!r} is not a whole number.", fix=f"use e.g. {name}={DEFAULTS[name]}")
            if most is not None and value > most:
                raise SdkitError(f"{name}={value} is more than sdkit runs (at most {most}).",
                                 fix=f"use {name}={DEFAULTS[name]}")
        for name, (low, high) in REAL_NUMBERS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SdkitError(f"{name}={value!r} is not a finite number.", fix=f"use e.g. {name}={DEFAULTS[name]}")
            if not low <= value <= high:
                raise SdkitError(f"{name}={value:g} is outside {low:g}..{high:g}.", fix=f"use e.g. {name}={DEFAULTS[name]}")
        for name in ("prompt", "negative_prompt", "sampler", "scheduler", "model", "init_image", "hires_upscaler"):
            if not isinstance(getattr(self, name), str):
                raise SdkitError(f"{name}={getattr(self, name)!r} is not text.", fix=f"pass {name} as a string")


# The count fields and their upper bounds (None: checked elsewhere), and the real-valued fields and their ranges;
# the ranges are wide (A1111's sliders are narrower): they only keep out values no run can mean.
WHOLE_NUMBERS = {"seed": None, "steps": 1000, "width": None, "height": None, "batch_size": 100, "clip_skip": None,
                 "hires_steps": 1000, "deep_cache": 10}
REAL_NUMBERS = {"cfg": (0.0, 100.0), "strength": (-math.inf, math.inf), "hires_scale": (-math.inf, math.inf),
                "cfg_until": (0.0, 1.0), "token_merging": (0.0, 1.0)}  # A1111 allows up to 0.9; over 0.75 merges no more
DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationSettings)
            if f.name in WHOLE_NUMBERS or f.name in REAL_NUMBERS}  # the usable value each error suggests

# A1111's hires upscalers that need no model file: latent-space interpolation, or resizing the decoded picture.
# Any other name is an upscale model in the upscale_models folder (sdkit.upscale), as in A1111's list.
HIRES_UPSCALERS = {"Latent": ("latent", "bilinear"), "Latent (nearest)": ("latent", "nearest"),
                   "Lanczos": ("pixels", "lanczos"), "Nearest": ("pixels", "nearest")}

# sdkit name -> (diffusers scheduler class, its settings). k-diffusion samplers use "linspace" spacing as A1111's
# Automatic schedule does; DDIM and LCM use "leading" with steps_offset=1 as A1111 and diffusers' SD do.
SAMPLERS: dict[str, tuple[str, dict]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False,
                               "clip_sample": False}),
    "lcm": ("LCMScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
}
NOISE_SCHEDULE = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                  "rescale_betas_zero_snr")
# A1111's schedule types (snake_case) -> the scheduler settings that give them in diffusers ("normal" = Automatic).
SCHEDULES: dict[str, dict] = {"normal": {}, "karras": {"use_karras_sigmas": True},
                              "exponential": {"use_exponential_sigmas": True}, "beta": {"use_beta_sigmas": True},
                              "sgm_uniform": {"timestep_spacing": "trailing"}}
SIGMA_SCHEDULES = ("karras", "exponential", "beta")  # these replace the sigmas: only the k-diffusion samplers take them
KARRAS_CAPABLE = ("euler", "heun", "dpm2", "dpm2_a", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde",
                  "dpmpp_sde", "unipc")


class Cancelled(SdkitError):
    """Generation was stopped by the cancel hook between two steps."""


def sampler_names() -> list[str]:
    """Every sampler name generate() accepts, including the `_karras` spellings."""
    return list(SAMPLERS) + [f"{name}_karras" for name in KARRAS_CAPABLE]


def check_sampler(settings: GenerationSettings) -> None:
    """Raise a clear error for a sampler or schedule that does not exist."""
    if settings.sampler not in SAMPLERS:
        raise SdkitError(f"Unknown sampler {settings.sampler!r}; known: {', '.join(sampler_names())}.",
                         fix="use one of those, e.g. sampler='euler_a'")
    if settings.scheduler in SIGMA_SCHEDULES and settings.sampler not in KARRAS_CAPABLE:
        shown = settings.scheduler.replace("_", " ").title()
        raise SdkitError(f"The {settings.sampler} sampler has no {shown} schedule; it works with: "
                         f"{', '.join(KARRAS_CAPABLE)}.", fix="use scheduler='normal'")
    if settings.sampler == "lcm" and settings.steps > 50:
        raise SdkitError(f"steps={settings.steps} is too many for the LCM sampler (at most 50; it is made for 2-8).",
                         fix="use steps=4")


def make_scheduler(base_config: dict, settings: GenerationSettings, *, seed: int | None = None):
    """The diffusers scheduler for the settings' sampler and schedule, on the model's noise schedule."""
    import diffusers

    cls, extra = SAMPLERS[settings.sampler]
    config = {k: v for k, v in base_config.items() if k in NOISE_SCHEDULE}
    config |= {"timestep_spacing": "linspace"} | extra
    config |= SCHEDULES[settings.scheduler]
    if settings.sampler == "dpmpp_sde":  # its Brownian tree draws from this seed, not from the generator
        config["noise_sampler_seed"] = settings.seed if seed is None else seed
    return getattr(diffusers, cls).from_config(config)


def _resolve_seed(seed: int) -> int:
    """A1111's -1 means a random seed; anything else is used as given."""
    import random

    return random.randrange(2**32) if seed == -1 else seed


def _capture_denoised(scheduler, seen: dict) -> None:
    """Record each step's estimate of the final latents (x0), for previews; schedulers that give none leave None."""
    import functools

    step = scheduler.step

    @functools.wraps(step)  # keeps step's signature: pipelines look in it for `eta` and `generator`
    def recording(*args, **kwargs):
        out = step(*args, **kwargs)
        x0 = out[1] if isinstance(out, tuple) and len(out) > 1 else getattr(out, "pred_original_sample", None)
        seen["denoised"] = getattr(out, "denoised", None) if x0 is None and not isinstance(out, tuple) else x0
        return out

    scheduler.step = recording


def _passes(settings: GenerationSettings) -> list[tuple[str, int]]:
    """The denoising passes of a run and how many steps each really takes (img2img runs strength x steps, as in
    A1111 and diffusers)."""
    first = int(settings.steps * settings.strength) if settings.init_image else settings.steps
    passes = [("img2img" if settings.init_image else "txt2img", max(1, first))]
    if settings.hires_scale > 1:
        passes.append(("hires", max(1, int((settings.hires_steps or settings.steps) * settings.strength))))
    return passes


def _img2img(pipe):
    """The image-to-image pipeline sharing `pipe`'s components (built once per pipeline)."""
    cached = pipe.__dict__.get("_sdkit_img2img")
    if cached is None:
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

        cls = StableDiffusionXLImg2ImgPipeline if hasattr(pipe, "text_encoder_2") else StableDiffusionImg2ImgPipeline
        expected, _ = cls._get_signature_keys(cls)
        parts = {k: v for k, v in pipe.components.items() if k in expected}
        extra = {} if hasattr(pipe, "text_encoder_2") else {"requires_safety_checker": False}
        with warnings.catch_warnings():  # its note on the scheduler's steps_offset: sdkit sets the scheduler per run
            warnings.simplefilter("ignore", FutureWarning)
            cached = cls(**parts, **extra)  # the same modules, untouched (from_pipe would cast them again)
        cached.set_progress_bar_config(disable=True)
        pipe.__dict__["_sdkit_img2img"] = cached
    cached.scheduler, cached.vae = pipe.scheduler, pipe.vae  # the run's scheduler, the VAE now applied
    return cached


def _controlled(pipe, kind: str, models: list):
    """The ControlNet pipeline ("txt2img" or "img2img") sharing `pipe`'s components, with these ControlNets."""
    import diffusers

    sdxl = hasattr(pipe, "text_encoder_2")
    name = {("txt2img", False): "StableDiffusionControlNetPipeline",
            ("img2img", False): "StableDiffusionControlNetImg2ImgPipeline",
            ("txt2img", True): "StableDiffusionXLControlNetPipeline",
            ("img2img", True): "StableDiffusionXLControlNetImg2ImgPipeline"}[kind, sdxl]
    cls = getattr(diffusers, name)
    key = (name, tuple(id(m) for m in models))
    cached = pipe.__dict__.setdefault("_sdkit_controlled", {})
    if key not in cached:
        expected, _ = cls._get_signature_keys(cls)
        parts = {k: v for k, v in pipe.components.items() if k in expected and k != "controlnet"}
        extra = {} if sdxl else {"requires_safety_checker": False}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            built = cls(**parts, controlnet=list(models), **extra)
        built.set_progress_bar_config(disable=True)
        cached.clear()  # one set of ControlNets at a time
        cached[key] = built
    built = cached[key]
    built.scheduler, built.vae = pipe.scheduler, pipe.vae
    return built


def _control_args(units: tuple, *, width: int, height: int, img2img: bool) -> dict:
    """The ControlNet arguments of one pass: control images at the pass's size, weights, start/end fractions."""
    from sdkit import controlnet

    pictures = [controlnet.control_picture(u, width=width, height=height) for u in units]
    return {"control_image" if img2img else "image": pictures,
            "controlnet_conditioning_scale": [u.weight for u in units],
            "control_guidance_start": [u.start for u in units], "control_guidance_end": [u.end for u in units]}


# Memory one UNet step holds beyond the weights, in bytes per (latent pixel x batch x first-block channel x item
# size): measured 59, 55 and 50 at 512², 1024² and 1536² (SD1.5-size UNet, random weights, bf16, batch 2, peak RSS
# sampled every 2 ms after malloc_trim; 2-core Xeon, 2026-11-27). 64 leaves room.
STEP_BYTES = 64


def memory_needed_gib(pipe, settings: GenerationSettings) -> float:
    """GiB a run's largest denoising pass needs beyond the loaded weights (from STEP_BYTES)."""
    width, height = settings.hires_size() if settings.hires_scale > 1 else (settings.width, settings.height)
    factor = getattr(pipe, "vae_scale_factor", 8)
    batch = 2 if settings.cfg > 1 else 1  # classifier-free guidance runs the UNet on two copies
    channels = pipe.unet.config.block_out_channels[0]
    return STEP_BYTES * (width // factor) * (height // factor) * batch * channels * pipe.unet.dtype.itemsize / 2**30


def _available_gib() -> float:
    """Memory the OS can give now, in GiB."""
    import psutil

    return psutil.virtual_memory().available / 2**30


def check_memory(pipe, settings: GenerationSettings) -> None:
    """Refuse, before any work, a run whose painting would not fit in free memory (instead of the OS killing it)."""
    need, free = memory_needed_gib(pipe, settings), _available_gib()
    if need <= free:
        return
    width, height = settings.hires_size() if settings.hires_scale > 1 else (settings.width, settings.height)
    shrink = math.sqrt(free / need)
    fits = f"{max(8, int(width * shrink) // 8 * 8)}x{max(8, int(height * shrink) // 8 * 8)}"
    raise SdkitError(f"a {width}x{height} picture needs about {need:.1f} GiB while it is painted, but only "
                     f"{free:.1f} GiB of memory is free.",
                     fix=f"use {fits} or smaller and enlarge it afterwards (hires fix or an upscale model), or close "
                         f"other programs")


def _init_image(settings: GenerationSettings):
    """The init image, RGB, resized to the run's size (A1111's "Just resize"); a clear error naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = settings.init_image
    try:
        with Image.open(path) as opened:
            picture = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise SdkitError(f"init image {path}: cannot be read as a picture ({error}).",
                         fix="pass a PNG or JPEG file") from None
    return picture.resize((settings.width, settings.height), Image.Resampling.LANCZOS)


def hires_model_path(settings: GenerationSettings):
    """The file of the upscale model a hires pass names (None for the built-in upscalers or no hires pass); an error
    naming the upscaler when there is no such file."""
    if settings.hires_scale <= 1 or settings.hires_upscaler in HIRES_UPSCALERS:
        return None
    from sdkit.paths import ModelPaths

    try:
        return ModelPaths.from_root(None).find("upscale_models", settings.hires_upscaler)
    except SdkitError as error:
        raise SdkitError(f"Hires upscaler {settings.hires_upscaler!r} is neither one sdkit runs without a file "
                         f"({', '.join(HIRES_UPSCALERS)}) nor an upscale model: {error.message}", fix=error.fix) from None


def _hires_model(pipe, settings: GenerationSettings):
    """The upscale model a hires pass names (None for the built-in upscalers), read once per file version."""
    path = hires_model_path(settings)
    if path is None:
        return None
    from sdkit import upscale

    cache = pipe.__dict__.setdefault("_sdkit_upscalers", {})
    key = (str(path), path.stat().st_mtime_ns)
    if key not in cache:
        cache.clear()
        cache[key] = upscale.load(path)
    return cache[key]


def _enlarge(pipe, latents, settings: GenerationSettings, model=None, notes: list[str] | None = None):
    """The first pass enlarged to the hires size: its latents interpolated, or its decoded picture resized or
    enlarged by an upscale model (then resized to the hires size, as A1111 does)."""
    import torch.nn.functional as F
    from PIL import Image

    width, height = settings.hires_size()
    space, mode = HIRES_UPSCALERS.get(settings.hires_upscaler, ("pixels", "model"))
    factor = getattr(pipe, "vae_scale_factor", 8)
    if space == "latent":
        return F.interpolate(latents, size=(height // factor, width // factor), mode=mode)
    from sdkit import vae as vaes

    picture = vaes.decode(pipe, latents, notes=notes)[0]
    if model is not None:
        from sdkit import upscale

        picture = upscale.upscale(model, picture, progress=False, notes=notes)
        mode = "lanczos"
    if picture.size == (width, height):
        return picture
    resample = Image.Resampling.LANCZOS if mode == "lanczos" else Image.Resampling.NEAREST
    return picture.resize((width, height), resample)


def _step_tensors(pipeline, settings: GenerationSettings) -> dict:
    """The step callback's tensors: the latents, and with fast mode's CFG stop those it cuts to the prompt's half."""
    if settings.cfg_until >= 1:
        return {}
    return {"callback_on_step_end_tensor_inputs": ["latents", *fast.cfg_tensors(pipeline)]}


def generate(pipe, settings: GenerationSettings, *, progress: bool = True, cancel=None, on_step=None) -> list:
    """Make `settings.batch_size` images (seeds seed, seed+1, ...); each carries its settings as `.sdkit_settings`.

    `cancel` is a callable (or threading.Event) checked between steps; when it is set, `Cancelled` is raised.
    `on_step(done, total, latents, denoised)` is called after every step (denoised: the step's x0 estimate or None).
    One run at a time per pipeline: a panel's worker thread and a notebook cell may share it, and diffusers keeps
    per-run state on the pipeline object.
    """
    import threading

    from sdkit import allocator

    lock = pipe.__dict__.setdefault("_sdkit_lock", threading.RLock())
    with lock:
        try:
            return _generate(pipe, settings, progress=progress, cancel=cancel, on_step=on_step)
        finally:
            allocator.trim()  # the steps reused memory; between pictures it goes back to the OS


def _unet_engine(pipe, settings: GenerationSettings, *, controlled: bool, notes: list[str]) -> str:
    """What runs the UNet for this picture: the measured choice (`python -m sdkit device`), except that OpenVINO's
    converted UNet is the plain SD1/SD2 UNet without LoRAs (converting with them costs as long as the first
    conversion, each time a weight changes), and does not take SDXL's extra conditioning, ControlNet, or fast mode's
    DeepCache and token merging (a note says so)."""
    from sdkit import device, loras

    chosen = device.choose(device.report())["unet"].backend
    if chosen != "openvino":
        return chosen
    kept = [name for name, used in (("SDXL's extra conditioning", pipe.unet.config.addition_embed_type is not None),
                                     ("LoRAs", bool(loras.active(pipe))), ("ControlNet", controlled),
                                     ("DeepCache", settings.deep_cache > 1),
                                     ("token merging", settings.token_merging > 0)) if used]
    need = 0.0 if kept or openvino_unet.converted(pipe) else openvino_unet.memory_needed_gib(pipe.unet)
    free = _available_gib() if need else 0.0
    if kept:
        why = f"OpenVINO runs the plain converted UNet only, not with {' or '.join(kept)}."
    elif need > free:  # a conversion that runs out of memory gets the whole session killed by the OS
        why = (f"converting it needs about {need:.1f} GiB and {free:.1f} GiB are free. Close other programs to use "
               f"OpenVINO, or set SDKIT_BACKEND=pytorch.")
    else:
        return chosen
    notes.append(f"The UNet ran in PyTorch, not OpenVINO (this machine's faster pick): {why}")
    return "pytorch"


def _generate(pipe, settings: GenerationSettings, *, progress: bool, cancel, on_step) -> list:
    """generate() without the lock."""
    import torch
    from tqdm.auto import tqdm

    # 1. Check the inputs before any work.
    settings.check()
    check_sampler(settings)
    check_memory(pipe, settings)
    is_set = (cancel.is_set if hasattr(cancel, "is_set") else cancel) or (lambda: False)
    seed = _resolve_seed(settings.seed)
    base_scheduler = dict(pipe.scheduler.config)
    warnings.filterwarnings("ignore", module="torchsde")  # its float-rounding notes about Brownian intervals
    hires_model = _hires_model(pipe, settings)
    from sdkit import controlnet as controlnets

    loaded = [controlnets.load(unit.model, pipe=pipe) for unit in settings.controlnets]  # refused here, before work
    units = tuple(dataclasses.replace(u, model=c.name, model_hash=c.model_hash)  # named as A1111 names them
                  for u, c in zip(settings.controlnets, loaded))
    models = [c.model for c in loaded]
    first_control = _control_args(units, width=settings.width, height=settings.height,
                                  img2img=bool(settings.init_image)) if models else {}
    hires_control = _control_args(units, width=settings.hires_size()[0], height=settings.hires_size()[1],
                                  img2img=True) if models and settings.hires_scale > 1 else {}  # A1111's "Hr Option: Both"
    layers = pipe.text_encoder.config.num_hidden_layers
    if settings.clip_skip > layers:
        raise SdkitError(f"clip_skip={settings.clip_skip} is more than this text encoder's {layers} layers.",
                         fix="use clip_skip=1 (or 2, as many anime models want)")
    # 2. The prompt's <lora:...> tags and embedding words: applied before encoding, kept in the image's settings.
    from sdkit import embeddings, loras, prompts
    from sdkit import vae as vaes

    prompt, applied = loras.from_prompt(pipe, settings.prompt)
    negative, _ = loras.tags(settings.negative_prompt)  # as in A1111, tags in the negative prompt apply nothing
    embeddings.from_prompt(pipe, prompt, negative)
    notes = [applied.message] if applied is not None and applied.message else []
    resources = {key: text for key, text in (("Lora hashes", loras.hashes(settings.prompt)),
                                             ("TI hashes", embeddings.hashes(pipe, prompt, negative))) if text}
    resources |= vaes.parameters(pipe)
    # 3. Encode the prompts once for the whole batch, in A1111's prompt language (weights, BREAK, long prompts).
    prompt_args, prompt_notes = prompts.encode(pipe, prompt, negative, clip_skip=settings.clip_skip)
    notes += prompt_notes
    engine = _unet_engine(pipe, settings, controlled=bool(models), notes=notes)
    images = []
    for index in range(settings.batch_size):
        image_seed = seed + index
        pipe.scheduler = make_scheduler(base_scheduler, settings, seed=image_seed)
        seen: dict = {}
        if on_step is not None:
            _capture_denoised(pipe.scheduler, seen)
        passes = _passes(settings)
        total = sum(n for _, n in passes)
        bar = tqdm(total=total, desc=f"image {index + 1}/{settings.batch_size} seed {image_seed}",
                   disable=not progress, leave=False)
        done_before, current = [0], [passes[0][1]]

        def after_step(_pipe, step, _t, tensors):
            calls = getattr(_pipe, "_num_timesteps", None) or len(_pipe.scheduler.timesteps)  # 2 per step: 2nd order
            bar.n = done_before[0] + min(current[0], round((step + 1) * current[0] / calls))
            bar.refresh()
            if on_step is not None:
                on_step(bar.n, total, tensors["latents"], seen.get("denoised"))
            if is_set():
                raise Cancelled(f"Generation cancelled after step {bar.n} of {total}.", fix="run it again")
            if _pipe.do_classifier_free_guidance and (step + 1) / calls >= settings.cfg_until:
                if fast.can_stop_cfg(_pipe):
                    tensors = fast.stop_cfg(_pipe, tensors)  # fast mode: the prompt alone from here on
                elif fast.KEPT_CFG not in notes:
                    notes.append(fast.KEPT_CFG)
            return tensors

        # 4. Denoise from this image's own seed, so image i of a batch equals a single run with seed + i.
        generator = torch.Generator("cpu").manual_seed(image_seed)
        common = {**prompt_args, "guidance_scale": settings.cfg, "generator": generator, "output_type": "latent",
                  "callback_on_step_end": after_step}
        try:
            with (torch.inference_mode(), fast.deep_cache(pipe.unet, interval=settings.deep_cache),
                  token_merging(pipe.unet, ratio=settings.token_merging),
                  openvino_unet.running(pipe, on=engine == "openvino", notes=notes) as unet_calls):
                if settings.init_image:
                    start = _init_image(settings)
                    img2img = _controlled(pipe, "img2img", models) if models else _img2img(pipe)
                    latents = img2img(image=start, strength=settings.strength, num_inference_steps=settings.steps,
                                      **first_control, **common, **_step_tensors(img2img, settings)).images
                else:
                    txt2img = _controlled(pipe, "txt2img", models) if models else pipe
                    latents = txt2img(num_inference_steps=settings.steps, width=settings.width,
                                      height=settings.height, **first_control, **common,
                                      **_step_tensors(txt2img, settings)).images
                done_before[0] = passes[0][1]
                current[0] = passes[-1][1]
                if settings.hires_scale > 1:  # 5. A1111's hires fix: enlarge, then redraw at `strength`
                    pipe.scheduler = make_scheduler(base_scheduler, settings, seed=image_seed)
                    if on_step is not None:
                        _capture_denoised(pipe.scheduler, seen)
                    bigger = _enlarge(pipe, latents, settings, hires_model, notes)
                    img2img = _controlled(pipe, "img2img", models) if models else _img2img(pipe)
                    latents = img2img(image=bigger, strength=settings.strength,
                                      num_inference_steps=settings.hires_steps or settings.steps,
                                      **hires_control, **common, **_step_tensors(img2img, settings)).images
        finally:
            bar.close()
        # 6. Decode with the VAE, and label the image with exactly what made it.
        image_notes = list(notes)
        if unet_calls and unet_calls["pytorch"]:
            image_notes.append(f"{unet_calls['pytorch']} of {sum(unet_calls.values())} UNet calls ran in PyTorch: "
                               "OpenVINO's converted UNet does not take their extra inputs.")
        if fast.is_on(settings):
            image_notes.append("Fast mode: " + fast.describe_run(settings) + ".")
        image = vaes.decode(pipe, latents, notes=image_notes)[0]
        image.sdkit_settings = settings.replace(seed=image_seed, batch_size=1, controlnets=units,
                                                extra={**settings.extra, **resources})
        image.sdkit_notes = image_notes  # what the learner should know about this run (e.g. LoRA layers that matched nothing)
        images.append(image)
    return images
