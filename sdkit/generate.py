"""GenerationSettings -> images: samplers by their common names, progress, cancel."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

from sdkit.errors import SdkitError

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
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.sampler.endswith("_karras"):
            self.sampler, self.scheduler = self.sampler[: -len("_karras")], "karras"

    def replace(self, **changes: object) -> "GenerationSettings":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """Raise a clear error for a setting no model can run."""
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
        if self.scheduler not in SCHEDULES:
            raise SdkitError(f"Schedule type {self.scheduler!r} has no diffusers equivalent here; sdkit runs: "
                             f"{', '.join(SCHEDULES)}.", fix="use scheduler='normal' (A1111's Automatic) or one of those")


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


def generate(pipe, settings: GenerationSettings, *, progress: bool = True, cancel=None, on_step=None) -> list:
    """Make `settings.batch_size` images (seeds seed, seed+1, ...); each carries its settings as `.sdkit_settings`.

    `cancel` is a callable (or threading.Event) checked between steps; when it is set, `Cancelled` is raised.
    `on_step(done, total, latents, denoised)` is called after every step (denoised: the step's x0 estimate or None).
    One run at a time per pipeline: a panel's worker thread and a notebook cell may share it, and diffusers keeps
    per-run state on the pipeline object.
    """
    import threading

    lock = pipe.__dict__.setdefault("_sdkit_lock", threading.RLock())
    with lock:
        return _generate(pipe, settings, progress=progress, cancel=cancel, on_step=on_step)


def _generate(pipe, settings: GenerationSettings, *, progress: bool, cancel, on_step) -> list:
    """generate() without the lock."""
    import torch
    from tqdm.auto import tqdm

    # 1. Check the inputs before any work.
    settings.check()
    check_sampler(settings)
    is_set = (cancel.is_set if hasattr(cancel, "is_set") else cancel) or (lambda: False)
    seed = _resolve_seed(settings.seed)
    base_scheduler = dict(pipe.scheduler.config)
    warnings.filterwarnings("ignore", module="torchsde")  # its float-rounding notes about Brownian intervals
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
    images = []
    for index in range(settings.batch_size):
        image_seed = seed + index
        pipe.scheduler = make_scheduler(base_scheduler, settings, seed=image_seed)
        seen: dict = {}
        if on_step is not None:
            _capture_denoised(pipe.scheduler, seen)
        bar = tqdm(total=settings.steps, desc=f"image {index + 1}/{settings.batch_size} seed {image_seed}",
                   disable=not progress, leave=False)

        def after_step(_pipe, step, _t, tensors):
            bar.n = min(settings.steps, round((step + 1) * settings.steps / len(_pipe.scheduler.timesteps)))
            bar.refresh()
            if on_step is not None:
                on_step(bar.n, settings.steps, tensors["latents"], seen.get("denoised"))
            if is_set():
                raise Cancelled(f"Generation cancelled after step {bar.n} of {settings.steps}.", fix="run it again")
            return tensors

        # 4. Denoise from this image's own seed, so image i of a batch equals a single run with seed + i.
        generator = torch.Generator("cpu").manual_seed(image_seed)
        try:
            with torch.inference_mode():
                latents = pipe(**prompt_args, num_inference_steps=settings.steps, guidance_scale=settings.cfg,
                               width=settings.width, height=settings.height, generator=generator,
                               output_type="latent", callback_on_step_end=after_step).images
        finally:
            bar.close()
        # 5. Decode with the VAE, and label the image with exactly what made it.
        image_notes = list(notes)
        image = vaes.decode(pipe, latents, notes=image_notes)[0]
        image.sdkit_settings = settings.replace(seed=image_seed, batch_size=1, extra={**settings.extra, **resources})
        image.sdkit_notes = image_notes  # what the learner should know about this run (e.g. LoRA layers that matched nothing)
        images.append(image)
    return images
