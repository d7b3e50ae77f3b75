"""Fast mode: fewer UNet FLOPs per image, each trade named: half the steps with a few-step sampler, reuse of the
deep features between steps (DeepCache), classifier-free guidance stopped once the picture's layout is settled
(one UNet pass per step instead of two), and token merging in the largest self-attention (sdkit.tome).

Every trade is a setting the picture's text records; `python -m sdkit bench --fast-mode` reports the time saved and,
on shapes-v1, the detector's accuracy and the PSNR of fast against full pictures of the same seed.
"""

from __future__ import annotations

import contextlib
from sdkit.errors import SdkitError
from sdkit.standins import StandIns
from sdkit.tome import MAX_RATIO

# What the panel's "fast mode" switch sets (measured: see `bench.fast_mode`).
FAST = {"deep_cache": 2, "cfg_until": 0.5, "token_merging": 0.5}
OFF = {"deep_cache": 1, "cfg_until": 1.0, "token_merging": 0.0}
# The few-step schedule: half the steps with a second-order multistep sampler on Karras sigmas, which gets as far
# in 10 steps as euler does in 20 (Karras et al. 2022; Lu et al., "DPM-Solver++", 2022).
FEW_STEPS = {"sampler": "dpmpp_2m", "scheduler": "karras"}
MIN_STEPS = 8


def apply(settings, *, fewer_steps: bool = True, deep_cache: int = FAST["deep_cache"],
          cfg_until: float = FAST["cfg_until"], token_merging: float = FAST["token_merging"]):
    """The fast version of a run: the few-step schedule (half the steps, at least MIN_STEPS), DeepCache, the CFG
    stop and token merging. Everything it changes is a setting, so the picture's text says how it was made."""
    changes: dict = {"deep_cache": deep_cache, "cfg_until": cfg_until, "token_merging": token_merging}
    if fewer_steps and settings.steps > MIN_STEPS:
        changes |= FEW_STEPS | {"steps": max(MIN_STEPS, -(-settings.steps // 2))}
    return settings.replace(**changes)


def describe(*, deep_cache: int, cfg_until: float, token_merging: float = 0.0) -> str:
    """One line naming what these settings trade ('' when all are off)."""
    trades = []
    if deep_cache > 1:
        trades.append(f"the UNet's deep blocks run every {deep_cache} steps and are reused in between (DeepCache)")
    if cfg_until < 1:
        trades.append(f"CFG (the negative prompt's pass) stops after {cfg_until:.0%} of the steps")
    if token_merging > 0:
        trades.append(f"{token_merging:.0%} of the tokens in the largest self-attention are merged with similar ones")
    return "; ".join(trades)


def describe_run(settings) -> str:
    """describe() for a GenerationSettings' own fast-mode fields."""
    return describe(**{name: getattr(settings, name) for name in OFF})


def is_on(settings) -> bool:
    """Whether a GenerationSettings asks for any fast-mode trade (any field away from OFF)."""
    return any(getattr(settings, name) != value for name, value in OFF.items())


class DeepCache:
    """Reuse the UNet's deep features across steps (Ma et al., "DeepCache", 2023): on a cheap step only the outermost
    down and up blocks run, and every deeper block hands back what it computed on the last full step.

    Written here because diffusers has no such switch; done by standing in for the deep blocks' `forward` (so the
    UNet's own forward, ControlNet residuals and SDXL's extra inputs stay as diffusers runs them). A call whose batch
    differs in shape from the cached one (CFG just stopped, or the hires pass began) runs in full.
    """

    def __init__(self, unet, *, interval: int) -> None:
        if len(unet.down_blocks) < 2 or len(unet.up_blocks) < 2:
            raise SdkitError("DeepCache needs a UNet with at least two down and two up blocks.",
                             fix="set deep_cache=1 for this model")
        self.unet, self.interval = unet, interval
        first = unet.down_blocks[0]
        self.deep = [*(first.downsamplers or []), *unet.down_blocks[1:], *([unet.mid_block] if unet.mid_block else []),
                     *unet.up_blocks[:-1]]
        self.cache: dict[int, object] = {}
        self.calls, self.shape, self.cheap = 0, None, False

    def _before(self, _module, args, kwargs) -> None:
        """Decide, before each UNet call, whether it is a full or a cheap one."""
        sample = args[0] if args else kwargs["sample"]
        self.cheap = self.calls % self.interval != 0 and self.shape == tuple(sample.shape) and bool(self.cache)
        if not self.cheap:
            self.shape = tuple(sample.shape)
        self.calls += 1

    def _stand_in(self, index: int, forward):
        """The block's forward, or on a cheap call its output from the last full call."""

        def run(*args, **kwargs):
            if self.cheap:
                return self.cache[index]
            self.cache[index] = output = forward(*args, **kwargs)
            return output

        return run

    def __enter__(self) -> "DeepCache":
        self._hook = self.unet.register_forward_pre_hook(self._before, with_kwargs=True)
        self._stand_ins = StandIns()
        for index, block in enumerate(self.deep):
            self._stand_ins.replace(block, lambda forward, index=index: self._stand_in(index, forward))
        return self

    def __exit__(self, *_exc) -> None:
        self._hook.remove()
        self._stand_ins.restore()
        self.cache.clear()


def deep_cache(unet, *, interval: int) -> DeepCache | contextlib.nullcontext:
    """DeepCache on `unet` for the duration (nothing when interval is 1)."""
    return DeepCache(unet, interval=interval) if interval > 1 else contextlib.nullcontext()


# The tensors a pipeline must hand to its step callback so CFG can be stopped: those batched [negative, positive]
# while CFG runs (SDXL adds its pooled embeddings and size ids; ControlNet pipelines their control images).
CFG_TENSORS = ("prompt_embeds", "add_text_embeds", "add_time_ids", "image", "control_image")


def cfg_tensors(pipe) -> list[str]:
    """Which of CFG_TENSORS this pipeline hands to its step callback."""
    return [name for name in CFG_TENSORS if name in getattr(pipe, "_callback_tensor_inputs", ())]


KEPT_CFG = ("CFG ran every step: this ControlNet pipeline does not hand its control image to the step callback, so "
            "its negative half cannot be dropped (CFG until was not applied).")


def can_stop_cfg(pipe) -> bool:
    """Whether CFG can stop mid-run in this pipeline: a ControlNet pipeline must hand its batched control image to
    the step callback (diffusers' SD and SDXL ControlNet pipelines do; one that does not keeps CFG, with a note)."""
    if not hasattr(pipe, "controlnet"):
        return True
    return any(name in getattr(pipe, "_callback_tensor_inputs", ()) for name in ("image", "control_image"))


def stop_cfg(pipe, tensors: dict) -> dict:
    """From the next step on, denoise with the prompt alone: guidance off, the negative half of each batch dropped."""
    pipe._guidance_scale = 1.0  # diffusers runs CFG while guidance_scale > 1
    for name in CFG_TENSORS:
        if isinstance(tensors.get(name), list):  # several ControlNets: one control image each
            tensors[name] = [_positive_half(t) for t in tensors[name]]
        elif tensors.get(name) is not None:
            tensors[name] = _positive_half(tensors[name])
    return tensors


def _positive_half(tensor):
    """The second (prompt) half of a [negative, positive] batch."""
    return tensor.chunk(2)[1] if tensor.shape[0] % 2 == 0 else tensor


def control_group(*, on: bool = False):
    """A panel group: the fast-mode switch, its four trades as controls, and a line naming what they give up."""
    import ipywidgets as w

    from sdkit.generate import WHOLE_NUMBERS
    from sdkit.widgets import ControlGroup

    class FastGroup(ControlGroup):
        title = "Fast mode"

        def __init__(self) -> None:
            values = FAST if on else OFF
            self.switch = w.Checkbox(value=on, description="fast mode", indent=False,
                                     tooltip="fewer UNet FLOPs per image; the picture changes a little")
            self.fewer = w.Checkbox(value=on, description="half the steps (DPM++ 2M Karras)", indent=False)
            self.interval = w.IntSlider(value=values["deep_cache"], min=1, max=WHOLE_NUMBERS["deep_cache"],
                                        description="DeepCache",
                                        tooltip="the deep blocks run every N steps and are reused in between; 1 = off")
            self.until = w.FloatSlider(value=values["cfg_until"], min=0.0, max=1.0, step=0.05, description="CFG until",
                                       tooltip="share of the steps that run the negative prompt's pass; 1 = all")
            self.merging = w.FloatSlider(value=values["token_merging"], min=0.0, max=MAX_RATIO, step=0.05,
                                         description="merge tokens",
                                         tooltip="share of the largest self-attention's tokens merged; 0 = off")
            self.trades = w.HTML()
            for slider in (self.interval, self.until, self.merging):
                slider.style.description_width = "100px"  # room for "merge tokens", the three aligned
            for widget, name in ((self.switch, "switch"), (self.fewer, "fewer-steps"), (self.interval, "deep-cache"),
                                 (self.until, "cfg-until"), (self.merging, "token-merging"), (self.trades, "trades")):
                widget.add_class(f"sdkit-fast-{name}")
            self.switch.observe(self._switched, names="value")
            for control in (self.fewer, self.interval, self.until, self.merging):
                control.observe(lambda _: self._describe(), names="value")
            self.widgets = [self.switch, self.fewer, self.interval, self.until, self.merging, self.trades]
            self._describe()

        def _switched(self, change) -> None:
            values = FAST if change["new"] else OFF
            self.fewer.value = change["new"]
            self.interval.value, self.until.value = values["deep_cache"], values["cfg_until"]
            self.merging.value = values["token_merging"]

        def _describe(self) -> None:
            line = describe(deep_cache=self.interval.value, cfg_until=self.until.value,
                            token_merging=self.merging.value)
            if self.fewer.value:
                line = "; ".join(filter(None, [f"half the steps (at least {MIN_STEPS}) with DPM++ 2M Karras", line]))
            self.trades.value = f"<small>{line or 'off: every step runs the whole UNet, with CFG'}</small>"

        def update(self, settings):
            """The trades into the run's settings (so the picture's text records them)."""
            return apply(settings, fewer_steps=self.fewer.value, deep_cache=self.interval.value,
                         cfg_until=self.until.value, token_merging=self.merging.value)

        def show(self, settings) -> None:
            """An earlier picture's fast-mode values back (its steps and sampler are already in the main controls)."""
            self.switch.value = is_on(settings)
            self.fewer.value = False
            self.interval.value, self.until.value = settings.deep_cache, settings.cfg_until
            self.merging.max = max(MAX_RATIO, settings.token_merging)  # an A1111 picture's 0.9 shown, not clamped
            self.merging.value = settings.token_merging

    return FastGroup()
