"""ControlNets: load the files people download, check they fit the checkpoint, and describe the units of a run.

    unit = controlnet.Unit(model="shapes-v1-layout", image="layout.png", weight=1.0, start=0.0, end=1.0)
    images = generate(pipe, GenerationSettings(prompt="a red circle", controlnets=(unit,)))

Three layouts load: lllyasviel's original single file (`control_model.*` with `input_hint_block`, `zero_convs`,
`middle_block_out`, as on civitai and in A1111's models/ControlNet), diffusers' (`controlnet_cond_embedding`,
`controlnet_down_blocks`, `controlnet_mid_block`), and "difference" ControlNets (original layout with a `difference`
tensor: the weights are stored minus the base UNet's, and the checkpoint's UNet is added back at load, as A1111 and
ComfyUI do). The network's shape is read from its tensors, as for checkpoints; a ControlNet whose family or block
widths do not match the checkpoint's UNet is refused before anything is generated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdkit import formats
from sdkit.errors import SdkitError
from sdkit.paths import ModelPaths

ORIGINAL = "control_model."
HINT = "input_hint_block."
DIFFUSERS_HINT = "controlnet_cond_embedding."
# A1111's ControlNet extension's names for sdkit's preprocessors and resize modes, as its infotext writes them.
MODULE_NAMES = {"none": "none", "canny": "canny", "scribble": "threshold", "lineart": "invert", "depth": "depth",
                "openpose": "openpose"}
RESIZE_NAMES = {"just_resize": "Just Resize", "crop_and_resize": "Crop and Resize", "resize_and_fill": "Resize and Fill"}
THRESHOLDS = {"canny": (100, 200), "scribble": (127, None)}  # the preprocessors' Threshold A / B as sdkit runs them
MAX_WEIGHT = 2.0  # A1111's Control Weight slider runs 0..2


@dataclass
class ControlNet:
    """A loaded ControlNet, ready to be handed to a pipeline."""

    name: str
    path: Path
    family: str
    layout: str  # "original", "diffusers" or "difference"
    model: torch.nn.Module
    model_hash: str  # A1111's short hash, shown as `name [hash]` in its text


@dataclass
class Unit:
    """One ControlNet in a run: which model, which control image (and how it is made), how strongly and when."""

    model: str
    image: str = ""  # the control image's file (or the photo a preprocessor reads); A1111's text does not carry it
    preprocess: str = "none"
    weight: float = 1.0  # A1111's Control Weight (diffusers' controlnet_conditioning_scale)
    start: float = 0.0  # fraction of the steps before which the ControlNet is off (Guidance Start)
    end: float = 1.0  # fraction of the steps after which it is off again (Guidance End)
    resize_mode: str = "crop_and_resize"
    picture: object = field(default=None, compare=False, repr=False)  # a PIL image made in the notebook (pose editor)
    model_hash: str = field(default="", compare=False)

    def check(self, index: int = 0) -> None:
        """Raise a clear error for a unit no run can use."""
        from sdkit import preprocess

        label = f"ControlNet unit {index} ({self.model or 'no model'})"
        if not self.model.strip():
            raise SdkitError(f"{label} names no ControlNet.", fix="name a file in models/controlnet")
        if not 0 <= self.weight <= MAX_WEIGHT:
            raise SdkitError(f"{label}: weight {self.weight:g} is outside 0..{MAX_WEIGHT:g}.", fix="use weight 1")
        if not 0 <= self.start < self.end <= 1:
            raise SdkitError(f"{label}: start {self.start:g} and end {self.end:g} must satisfy 0 <= start < end <= 1 "
                             f"(fractions of the steps).", fix="use start 0 and end 1 (the whole run)")
        if self.preprocess not in preprocess.ALL_PREPROCESSORS:
            raise SdkitError(f"{label}: no preprocessor {self.preprocess!r}.",
                             fix=f"use one of {', '.join(preprocess.ALL_PREPROCESSORS)}")
        if self.resize_mode not in preprocess.RESIZE_MODES:
            raise SdkitError(f"{label}: no resize mode {self.resize_mode!r}.",
                             fix=f"use one of {', '.join(preprocess.RESIZE_MODES)}")
        if self.picture is None and not self.image:
            raise SdkitError(f"{label} has no control image (A1111's text does not carry one).",
                             fix="pass --control-image FILE, or set the unit's image")

    def describe(self, *, width: int, height: int) -> str:
        """The unit as A1111's ControlNet extension writes it in the `parameters` text."""
        low, high = THRESHOLDS.get(self.preprocess, (None, None))
        fields = {"Module": MODULE_NAMES.get(self.preprocess, self.preprocess),
                  "Model": f"{self.model} [{self.model_hash}]" if self.model_hash else self.model,
                  "Weight": _number(self.weight), "Resize Mode": RESIZE_NAMES[self.resize_mode],
                  "Processor Res": min(width, height), "Threshold A": low, "Threshold B": high,
                  "Guidance Start": _number(self.start), "Guidance End": _number(self.end),
                  "Pixel Perfect": False, "Control Mode": "Balanced"}
        return ", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None)


def _number(value: float) -> str:
    """A number as A1111 prints it (1 rather than 1.0)."""
    return f"{value:g}"


def parse_unit(text: str) -> Unit:
    """A Unit from the text A1111's ControlNet extension writes (the control image is not in it)."""
    values = dict(part.split(": ", 1) for part in (p.strip() for p in text.split(", ")) if ": " in part)
    modules = {v: k for k, v in MODULE_NAMES.items()}
    resizes = {v: k for k, v in RESIZE_NAMES.items()}
    model, model_hash = values.get("Model", ""), ""
    if m := re.fullmatch(r"(.*?) \[([0-9a-fA-F]+)\]", model):
        model, model_hash = m[1], m[2]
    try:
        return Unit(model=model, preprocess=modules.get(values.get("Module", "none"), values.get("Module", "none")),
                    weight=float(values.get("Weight", 1)), start=float(values.get("Guidance Start", 0)),
                    end=float(values.get("Guidance End", 1)),
                    resize_mode=resizes.get(values.get("Resize Mode", "Crop and Resize"), "crop_and_resize"),
                    model_hash=model_hash)
    except ValueError as error:
        raise SdkitError(f"ControlNet text {text[:80]!r} has a value that is not a number ({error}).",
                         fix="write Weight, Guidance Start and Guidance End as numbers") from None


def parse_spec(spec: str, *, image: str = "", preprocess: str = "none", resize_mode: str = "crop_and_resize") -> Unit:
    """A Unit from the command line's NAME[:WEIGHT[:START:END]]."""
    name, *numbers = spec.rsplit(":", 3) if spec.count(":") in (1, 3) else [spec]
    if len(numbers) not in (0, 1, 3):
        raise SdkitError(f"--controlnet {spec!r} is not NAME[:WEIGHT[:START:END]].", fix="e.g. shapes-v1-layout:1:0:1")
    try:
        values = [float(n) for n in numbers]
    except ValueError:
        raise SdkitError(f"--controlnet {spec!r}: {', '.join(numbers)} should be numbers.",
                         fix="e.g. shapes-v1-layout:0.8 or shapes-v1-layout:1:0:0.5") from None
    weight, start, end = (values + [1.0, 0.0, 1.0][len(values):]) if len(values) != 1 else (values[0], 0.0, 1.0)
    return Unit(model=name, image=image, preprocess=preprocess, weight=weight, start=start, end=end,
                resize_mode=resize_mode)


def control_picture(unit: Unit, *, width: int, height: int):
    """The unit's control image at the run's size: its file or picture, through its preprocessor and resize mode."""
    from PIL import Image, UnidentifiedImageError

    from sdkit import preprocess

    picture = unit.picture
    if picture is None:
        try:
            with Image.open(unit.image) as opened:
                picture = opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise SdkitError(f"control image {unit.image}: cannot be read as a picture ({error}).",
                             fix="pass a PNG or JPEG file") from None
    control = preprocess.run(unit.preprocess, picture)
    return preprocess.resize(control, width=width, height=height, mode=unit.resize_mode)


# --- loading -------------------------------------------------------------------------------------------------------


def layout(names: list[str]) -> str | None:
    """'original', 'difference', 'diffusers', or None (not a ControlNet), from the tensor names."""
    if any(n.startswith(ORIGINAL + HINT) for n in names):
        return "difference" if "difference" in names else "original"
    if any(n.startswith(HINT) for n in names) and any(n.startswith("zero_convs.") for n in names):
        return "original"  # saved without the control_model. prefix (some SD2 ControlNets)
    if any(n.startswith(DIFFUSERS_HINT) for n in names):
        return "diffusers"
    return None


def _looks_like(names: list[str]) -> str:
    """What a file that is not a ControlNet seems to be."""
    if any(n.startswith("lora_controlnet") for n in names) or any("lora_controlnet" in n for n in names):
        return "a Control-LoRA (Stability's LoRA-compressed ControlNet), which sdkit does not run yet"
    if any(n.startswith(("adapter.", "body.", "conv_in.")) for n in names) and not any("attn" in n for n in names):
        return "a T2I-Adapter, which sdkit does not run yet"
    from sdkit import vae

    return vae._looks_like(names)


def _ldm_names(state: dict, kind: str) -> dict:
    """The ControlNet's tensors in original-layout names without the `control_model.` prefix."""
    if kind == "diffusers":
        from sdkit import convert

        per = len({k.split(".")[3] for k in state if k.startswith("down_blocks.0.resnets.")})
        return {k.removeprefix(ORIGINAL): v for k, v in convert.controlnet_to_ldm(state, layers_per_block=per).items()}
    return {k.removeprefix(ORIGINAL): v for k, v in state.items() if k != "difference"}


def _family(state: dict, metadata: dict[str, str]) -> str | None:
    """The family a ControlNet was made for: sdkit's metadata, or its cross-attention width (None: a width no
    family has; then only the block check below decides)."""
    if metadata.get("modelspec.architecture", "").startswith("sdkit-shapes"):
        return "shapes"
    width = next((v.shape[1] for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    return formats.CONTEXT_DIM_FAMILY.get(width)


def config(state: dict, family: str, *, unet: dict | None = None) -> dict:
    """The diffusers ControlNetModel config of original-layout tensors: shapes from the tensors; what no tensor
    shows (norm groups, head counts, SDXL's time-embedding width) from the checkpoint's UNet config `unet`, else the
    family's shipped one."""
    import inspect
    import json

    from diffusers import ControlNetModel

    from sdkit import checkpoints

    specs = {"model.diffusion_model." + k: formats.TensorSpec(str(v.dtype), tuple(v.shape)) for k, v in state.items()}
    base = dict(unet) if unet is not None else json.loads((checkpoints.CONFIGS / family / "unet" / "config.json").read_text())
    derived = checkpoints._unet_config(specs, family)
    accepted = set(inspect.signature(ControlNetModel.__init__).parameters)
    hint = sorted(int(k.split(".")[1]) for k in state if k.startswith(HINT) and k.endswith(".weight"))
    channels = [state[f"{HINT}{i}.weight"].shape[0] for i in hint[:-1]]  # conv_in, then pairs (same, stride 2)
    values = {k: v for k, v in (base | derived).items() if k in accepted and not k.startswith("_")}
    values |= {"conditioning_channels": state[f"{HINT}0.weight"].shape[1],
               "conditioning_embedding_out_channels": [channels[0]] + channels[2::2]}
    return values


def _check_fits(controlnet, pipe, *, path: Path) -> None:
    """Refuse a ControlNet whose blocks do not match the checkpoint's UNet (its residuals would not fit)."""
    info = getattr(pipe, "sdkit", None)
    checkpoint = f"{info.name} ({info.family})" if info else "this checkpoint"
    unet, net = pipe.unet.config, controlnet.config
    if (list(net.block_out_channels), net.cross_attention_dim) != (list(unet.block_out_channels),
                                                                    unet.cross_attention_dim):
        raise SdkitError(f"ControlNet {path.name} is made for a UNet with blocks {list(net.block_out_channels)} and "
                         f"cross-attention {net.cross_attention_dim}, but checkpoint {checkpoint} has blocks "
                         f"{list(unet.block_out_channels)} and cross-attention {unet.cross_attention_dim}.",
                         fix="use a ControlNet made for this checkpoint's family (SD1, SD2 and SDXL each have their own)")


def _difference_base(pipe) -> dict:
    """The checkpoint's UNet in original-layout names (no prefix), to add to a difference ControlNet."""
    from sdkit import convert

    unet = pipe.unet.config
    state = convert.unet_to_ldm(pipe.unet.state_dict(), layers_per_block=unet.layers_per_block,
                                up_attentions=[t.startswith("CrossAttn") for t in unet.up_block_types])
    return {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}


def build(state: dict, *, family: str, path: Path, unet: dict | None = None) -> torch.nn.Module:
    """A diffusers ControlNetModel (fp32) from original-layout tensors, every weight checked."""
    from diffusers import ControlNetModel

    from sdkit import convert

    model = ControlNetModel.from_config(config(state, family, unet=unet))
    hints = len({k.split(".")[2] for k in model.state_dict() if k.startswith(DIFFUSERS_HINT + "blocks.")})
    expected = model.state_dict()
    converted, missing = {}, []
    for key, value in expected.items():
        name = convert.controlnet_key(key, layers_per_block=model.config.layers_per_block, hint_blocks=hints)
        if name not in state:
            missing.append(name)
        elif tuple(state[name].shape) != tuple(value.shape):
            raise SdkitError(f"{path.name}: tensor {name} is {list(state[name].shape)}, but this ControlNet needs "
                             f"{list(value.shape)}.", fix="the file is damaged or mixes models; download it again")
        else:
            converted[key] = state[name].float()
    if missing:
        raise SdkitError(f"{path.name}: {len(missing)} ControlNet weights are missing (e.g. {', '.join(missing[:3])}).",
                         fix="the file is damaged or only part of a ControlNet; download it again")
    model.load_state_dict(converted)
    return model


def _check_fits_memory(path: Path, *, parameters: int, item: int) -> None:
    """Refuse, before reading it, a ControlNet whose weights (read in fp32, then kept at the UNet's precision) need
    more memory than is free."""
    import psutil

    need = parameters * (4 + item) / 2**30
    free = psutil.virtual_memory().available / 2**30
    if need > free:
        raise SdkitError(f"ControlNet {path.name} needs about {need:.1f} GiB to load, but only {free:.1f} GiB of memory "
                         f"is free.", fix="close other programs, or use a smaller ControlNet (an fp16 or 'small' version)")


def load(name_or_path: str | Path, *, pipe, root: str | Path | None = None) -> ControlNet:
    """Read a ControlNet (by name in models/controlnet, or a path) for `pipe`'s checkpoint; refuse one that does not
    fit it. Cached on the pipeline per file version."""
    from sdkit import device
    from sdkit.optimize import prepare

    path = ModelPaths.from_root(root).find("controlnet", name_or_path)
    stat = path.stat()
    cache = pipe.__dict__.setdefault("_sdkit_controlnets", {})
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in cache:
        return cache[key]
    about = peek(path)  # refuses a file that is not a ControlNet
    kind = about["layout"]
    _check_fits_memory(path, parameters=about["parameters"], item=pipe.unet.dtype.itemsize)
    state, metadata = formats.read_tensors(path)
    state = _ldm_names(state, kind)
    info = getattr(pipe, "sdkit", None)
    family = _family(state, metadata) or (info.family if info else "sd1")
    if info is not None and family != info.family:
        raise SdkitError(f"ControlNet {path.name} is made for {family} models, but checkpoint {info.name} is {info.family}.",
                         fix=f"use a ControlNet made for {info.family} models, or a {family} checkpoint")
    if kind == "difference":  # stored as (ControlNet - base UNet): add this checkpoint's UNet back
        base = _difference_base(pipe)
        state = {k: v.float() + base[k].float() if k in base and base[k].shape == v.shape else v
                 for k, v in state.items()}
    with torch.no_grad():
        model = build(state, family=family, path=path, unet=dict(pipe.unet.config))
    _check_fits(model, pipe, path=path)
    choice = device.choose(device.report())["unet"]
    model = prepare(model, part="unet", choice=choice)
    if model.dtype != pipe.unet.dtype:  # residuals add to the UNet's activations: same dtype
        model = model.to(dtype=pipe.unet.dtype)
    while len(cache) >= 4:  # a few at once (several units), not every file ever tried
        cache.pop(next(iter(cache)))
    cache[key] = ControlNet(name=path.stem, path=path, family=family, layout=kind, model=model,
                            model_hash=formats.sha256(path)[:8])
    return cache[key]


def peek(name_or_path: str | Path, *, root: str | Path | None = None) -> dict:
    """What a ControlNet file is, from its header alone (no weights read): refuses a file that is not one. The CLI
    calls it before the long checkpoint load."""
    path = ModelPaths.from_root(root).find("controlnet", name_or_path)
    specs, metadata = formats.read_specs(path)
    kind = layout(list(specs))
    if kind is None:
        raise SdkitError(f"{path.name} is not a ControlNet: it has no {ORIGINAL}{HINT}* or {DIFFUSERS_HINT}* tensors "
                         f"(it looks like {_looks_like(list(specs))}).",
                         fix="put ControlNet files (e.g. control_v11p_sd15_canny.pth) in models/controlnet, and "
                             "checkpoints, LoRAs and others in their own folders")
    width = next((s.shape[1] for k, s in specs.items() if k.endswith("attn2.to_k.weight")), None)
    family = "shapes" if metadata.get("modelspec.architecture", "").startswith("sdkit-shapes") else \
        formats.CONTEXT_DIM_FAMILY.get(width, f"unknown ({width}-wide cross-attention)")
    return {"name": path.stem, "layout": kind, "family": family, "tensors": len(specs),
            "parameters": sum(s.numel for k, s in specs.items() if k != "difference"),
            "sha256": formats.sha256(path)}


def describe(controlnet: ControlNet) -> dict:
    """What a loaded ControlNet is, for `info` and the notebook."""
    net = controlnet.model.config
    return {"name": controlnet.name, "family": controlnet.family, "layout": controlnet.layout,
            "parameters": sum(p.numel() for p in controlnet.model.parameters()),
            "blocks": list(net.block_out_channels), "hint channels": list(net.conditioning_embedding_out_channels),
            "hash": controlnet.model_hash}


# --- the panel -----------------------------------------------------------------------------------------------------


def _models(root=None) -> list[str]:
    """The ControlNets in the models folders, by name (what the dropdown offers)."""
    return [str(Path(name).with_suffix("")) for name in ModelPaths.from_root(root).list("controlnet")]


def control_group(*, source=None, model: str = "shapes-v1-layout", weight: float = 1.0, start: float = 0.0,
                  end: float = 1.0, preprocess: str = "none", on: bool = True, unit: int = 0):
    """A panel group: one ControlNet unit with its model, control image, preprocessor, weight and start/end.

    Several groups make several units (each adds its own; `unit` is which of a picture's units "Use" puts back
    into this one).

    `source` is where the control image comes from: an editor with `.widget` and `.picture()` (`pose.Editor`,
    `sdkit.shapes.controls.LayoutEditor`), redrawn live, or a fixed picture (a PIL image or a file's path).
    """
    import ipywidgets as w
    from PIL import Image

    from sdkit import preprocess as preprocessors
    from sdkit.widgets import ControlGroup, png

    class ControlNetGroup(ControlGroup):
        title = f"ControlNet {unit}" if unit else "ControlNet"

        def __init__(self) -> None:
            self.source = Image.open(source).convert("RGB") if isinstance(source, (str, Path)) else source
            options = _models()
            self.on = w.Checkbox(value=on, description="use it")
            self.model = w.Dropdown(options=options or [model], value=model if model in options or not options
                                    else options[0], description="model")
            self.preprocess = w.Dropdown(options=list(preprocessors.ALL_PREPROCESSORS), value=preprocess,
                                         description="preprocess", style={"description_width": "initial"})
            self.weight = w.FloatSlider(value=weight, min=0.0, max=MAX_WEIGHT, step=0.05, description="weight",
                                        continuous_update=False)
            self.steps = w.FloatRangeSlider(value=(start, end), min=0.0, max=1.0, step=0.05,
                                            description="start/end", continuous_update=False)
            self.resize = w.Dropdown(options=list(preprocessors.RESIZE_MODES), value="crop_and_resize",
                                     description="resize")
            for widget, name in ((self.on, "on"), (self.model, "model"), (self.preprocess, "preprocess"),
                                 (self.weight, "weight"), (self.steps, "start-end"), (self.resize, "resize")):
                widget.add_class(f"sdkit-controlnet-{name}")
            editor = getattr(self.source, "widget", None)
            if editor is None and self.source is not None:  # a fixed picture: show it
                shown = self.source.copy()
                shown.thumbnail((128, 128))
                editor = w.Image(value=png(shown), format="png", layout=w.Layout(width="128px"))
            self.widgets = [self.on, self.model] + ([editor] if editor is not None else []) + [
                self.preprocess, self.weight, self.steps, self.resize]

        def picture(self):
            """The control image's source as it stands (before the preprocessor)."""
            if self.source is None:
                return None
            return self.source.picture() if hasattr(self.source, "picture") else self.source

        def update(self, settings):
            """settings with this group's ControlNet unit added after the others (off: nothing added)."""
            if not self.on.value:
                return settings
            made = Unit(model=self.model.value, picture=self.picture(), preprocess=self.preprocess.value,
                        weight=self.weight.value, start=self.steps.value[0], end=self.steps.value[1],
                        resize_mode=self.resize.value)
            return settings.replace(controlnets=(*settings.controlnets, made))

        def show(self, settings) -> None:
            """An earlier picture's ControlNet settings back into the controls (the control image stays)."""
            self.on.value = len(settings.controlnets) > unit
            if self.on.value:
                shown = settings.controlnets[unit]
                if shown.model in self.model.options:
                    self.model.value = shown.model
                self.preprocess.value = shown.preprocess
                self.weight.value = shown.weight
                self.steps.value = (shown.start, shown.end)
                self.resize.value = shown.resize_mode

    return ControlNetGroup()
