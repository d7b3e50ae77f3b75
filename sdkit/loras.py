"""LoRAs onto a loaded pipeline and off again: kohya LoRA/LoCon, LyCORIS LoHa/LoKr, DoRA, and diffusers/PEFT files.

    style = loras.load("outlines")                 # a name in models/loras (or a path)
    loras.apply(pipe, [(style, 0.8)])              # the set of LoRAs now active, each with its weight
    loras.remove(pipe)                             # every weight back, bit for bit

Weights are merged into the model (as A1111 and ComfyUI do), so a LoRA costs nothing per step; the original of
every changed weight is kept, so moving a weight slider recomputes from the original and removing restores it
exactly. The delta formulas follow LyCORIS as ComfyUI applies them (comfy/weight_adapter/): written here because
diffusers loads only plain LoRAs and needs the PEFT package to do it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdkit import formats
from sdkit.errors import SdkitError
from sdkit.paths import ModelPaths

# A file's tensor names end in one of these; what comes before is the layer's name in the file.
PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
         "lora.down.weight", "lora.up.weight", "lora_linear_layer.down.weight", "lora_linear_layer.up.weight",
         "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
         "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
         "alpha", "dora_scale")
PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
# What the files' own metadata says about the model they were trained for.
BASE_MODELS = (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("stable-diffusion-xl", "sdxl"),
               ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1"), ("sdkit-shapes", "shapes"))
CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "shapes": "shapes-world"}


@dataclass
class Layer:
    """One layer's change as the file stores it: its kind (lora, loha, lokr) and tensors."""

    kind: str
    tensors: dict[str, torch.Tensor]

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """The weight change at weight 1, in fp32, shaped like the weight (alpha/rank applied)."""
        t = {k: v.float() for k, v in self.tensors.items() if k not in ("alpha", "dora_scale")}
        alpha = float(self.tensors["alpha"]) if "alpha" in self.tensors else None
        if self.kind == "lora":
            up, down = t["up"].flatten(1), t["down"].flatten(1)
            if "mid" in t:  # LoCon with a Tucker middle (CP decomposition of a conv kernel)
                diff = torch.einsum("m n ..., i m, n j -> i j ...", t["mid"], up, down)
            else:
                diff = up @ down
            rank = t["down"].shape[0]
        elif self.kind == "loha":
            m1 = (torch.einsum("i j ..., j r, i p -> p r ...", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
                  if "hada_t1" in t else t["hada_w1_a"] @ t["hada_w1_b"])
            m2 = (torch.einsum("i j ..., j r, i p -> p r ...", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
                  if "hada_t2" in t else t["hada_w2_a"] @ t["hada_w2_b"])
            diff, rank = m1 * m2, t["hada_w1_b"].shape[0]
        else:  # lokr: a Kronecker product of two (maybe low-rank) factors
            rank = None
            w1 = t.get("lokr_w1")
            if w1 is None:
                w1, rank = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
            w2 = t.get("lokr_w2")
            if w2 is None:
                rank = t["lokr_w2_b"].shape[0]
                w2 = (torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
                      if "lokr_t2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"])
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]
            diff = torch.kron(w1, w2)
        if diff.numel() != shape.numel():
            raise ValueError(f"{list(diff.shape)} vs {list(shape)}")
        scale = alpha / rank if alpha is not None and rank else 1.0
        return diff.reshape(shape) * scale


@dataclass
class Lora:
    """A LoRA file, read: its layers by the names the file uses, and what it says about itself."""

    name: str
    path: Path
    layers: dict[str, Layer]
    metadata: dict[str, str] = field(default_factory=dict)
    family: str | None = None  # from the metadata or the tensor shapes; None when the file can't tell
    family_clue: str = ""

    @property
    def shorthash(self) -> str:
        """A1111's "Lora hashes" entry: 12 hex digits of kohya's data hash (the whole file's sha256 for pickles)."""
        if formats.file_format(self.path) == "safetensors":
            return formats.addnet_hash(self.path)[:12]
        return formats.sha256(self.path)[:12]

    @property
    def trigger_words(self) -> list[str]:
        """The tags kohya recorded as most frequent in the training captions (the usual trigger words)."""
        import json

        try:
            freq = json.loads(self.metadata.get("ss_tag_frequency", "{}"))
        except ValueError:
            return []
        counts: dict[str, int] = {}
        for tags in freq.values():
            for tag, n in tags.items():
                counts[tag] = counts.get(tag, 0) + int(n)
        return sorted(counts, key=counts.get, reverse=True)[:5]


def _split(key: str) -> tuple[str, str] | None:
    """(layer name, part) of a tensor name, or None for a tensor that is no part of a layer's change."""
    for part in PARTS:
        if key.endswith("." + part):
            layer = key[: -len(part) - 1]
            if layer.endswith("_lora") and part.startswith("lora."):  # diffusers attention processors: to_q_lora.up
                layer = layer[: -len("_lora")]
            return layer, part
    return None


def _layers(state: dict[str, torch.Tensor], *, path: Path) -> tuple[dict[str, Layer], list[str]]:
    """Group a file's tensors into layers; the names that fit no known layout are returned apart."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    strange = []
    for key, tensor in state.items():
        split = _split(key)
        if split is None:
            strange.append(key)
            continue
        grouped.setdefault(split[0], {})[split[1]] = tensor
    layers = {}
    renames = {"lora_up.weight": "up", "lora_B.weight": "up", "lora.up.weight": "up",
               "lora_linear_layer.up.weight": "up", "lora_down.weight": "down", "lora_A.weight": "down",
               "lora.down.weight": "down", "lora_linear_layer.down.weight": "down", "lora_mid.weight": "mid"}
    for name, parts in grouped.items():
        tensors = {renames.get(k, k): v for k, v in parts.items()}
        kind = ("loha" if "hada_w1_a" in tensors else "lokr" if any(k.startswith("lokr_") for k in tensors)
                else "lora" if {"up", "down"} <= set(tensors) else None)
        if kind is None:
            strange += [f"{name}.{p}" for p in parts]
            continue
        layers[name] = Layer(kind=kind, tensors=tensors)
    if not layers:
        raise SdkitError(f"{path.name} holds no LoRA layers (tensors like '…lora_down.weight', '…hada_w1_a', "
                         f"'…lokr_w1' or '…lora_A.weight'; found e.g. {', '.join(list(state)[:3])}).",
                         fix="check that the file is a LoRA/LyCORIS file; `python -m sdkit info FILE` tells what it is")
    return layers, strange


def _family(layers: dict[str, Layer], metadata: dict[str, str]) -> tuple[str | None, str]:
    """The family a LoRA was trained for, and the clue: metadata first, then the widths of its tensors."""
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = metadata.get(key, "")
        for needle, family in BASE_MODELS:
            if value.startswith(needle):
                return family, f"{key} = {value!r}"
    if any(name.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for name in layers):
        return "sdxl", "it has two text encoders' layers (lora_te1_/lora_te2_)"
    for name, layer in layers.items():
        if re.search(r"attn2[._]to_k", name) and "down" in layer.tensors:
            width = layer.tensors["down"].shape[1]
            if width in CONTEXT_FAMILY:
                return CONTEXT_FAMILY[width], f"its cross-attention layers read {width}-wide text features"
    return None, ""


def load(name_or_path: str | Path, *, root: str | Path | None = None) -> Lora:
    """Read a LoRA (by name in the loras folder, or a path); nothing is applied yet."""
    path = ModelPaths.from_root(root).find("loras", name_or_path)
    state, metadata = formats.read_tensors(path)
    layers, strange = _layers(state, path=path)
    family, clue = _family(layers, metadata)
    lora = Lora(name=path.stem, path=path, layers=layers, metadata=metadata, family=family, family_clue=clue)
    lora.strange = strange  # tensors that belong to no layer: reported when applied
    return lora


# --- where a file's layer names point in a pipeline ------------------------------------------------------


def _ldm_unet_names(pipe) -> dict[str, str]:
    """diffusers UNet parameter name -> the original (LDM/SAI) name, from the checkpoint's own tensor names."""
    from diffusers.loaders import single_file_utils as ldm

    info = getattr(pipe, "sdkit", None)
    if info is None:
        return {}
    specs, _ = formats.read_specs(info.path)
    fake = {k: torch.empty(s.shape, device="meta") for k, s in specs.items() if k.startswith("model.diffusion_model.")}
    original = {id(v): k.removeprefix("model.diffusion_model.") for k, v in fake.items()}
    converted = ldm.convert_ldm_unet_checkpoint(dict(fake), config=dict(pipe.unet.config))
    return {k: original[id(v)] for k, v in converted.items() if id(v) in original}


def targets(pipe) -> dict[str, tuple[str, str]]:
    """Every name a LoRA file may give a layer of this pipeline -> (component, module name)."""
    cache = pipe.__dict__.get("_sdkit_lora_targets")
    if cache is not None:
        return cache
    names: dict[str, tuple[str, str]] = {}
    components = [c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
    ldm_names = _ldm_unet_names(pipe)
    for component in components:
        model = getattr(pipe, component)
        for module_name, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            where = (component, module_name)
            names[f"{component}.{module_name}"] = where  # diffusers / PEFT
            if component == "unet":
                names["lora_unet_" + module_name.replace(".", "_")] = where  # kohya, diffusers-style names
                original = ldm_names.get(module_name + ".weight")
                if original:
                    names["lora_unet_" + original.removesuffix(".weight").replace(".", "_")] = where  # kohya, SAI-style
            else:
                full = module_name if module_name.startswith("text_model.") else "text_model." + module_name
                prefixes = ("lora_te_", "lora_te1_") if component == "text_encoder" else ("lora_te2_",)
                for prefix in prefixes:
                    names[prefix + full.replace(".", "_")] = where
                names[f"{component}.{full}"] = where
    pipe.__dict__["_sdkit_lora_targets"] = names
    return names


def _normal(name: str) -> str:
    """A file's layer name as targets() spells it (diffusers attention-processor names included)."""
    name = name.replace(".processor.", ".").replace(".to_out_lora", ".to_out.0")
    return re.sub(r"\.to_out$", ".to_out.0", name) if ".attn" in name else name


def _pipe_family(pipe) -> str:
    """The loaded model's family."""
    info = getattr(pipe, "sdkit", None)
    return info.family if info else ("sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd1")


@dataclass
class Applied:
    """What apply() did: layers changed, and the file's layers that match nothing in this model."""

    changed: int
    unmatched: dict[str, list[str]]

    @property
    def message(self) -> str:
        """One line for the learner (empty when every layer matched)."""
        return "; ".join(f"{len(names)} layers of {lora} match nothing in this model (e.g. {names[0]}): "
                         f"they were not applied" for lora, names in self.unmatched.items() if names)


def _plan(pipe, chosen: list[tuple[Lora, float]]) -> tuple[dict, dict[str, list[str]]]:
    """(component, module) -> [(layer, weight)], checked against the model before anything changes."""
    family = _pipe_family(pipe)
    names = targets(pipe)
    plan: dict[tuple[str, str], list[tuple[Layer, float]]] = {}
    unmatched: dict[str, list[str]] = {}
    for lora, weight in chosen:
        if lora.family and lora.family != family:
            raise SdkitError(
                f"{lora.path.name} is a LoRA for {FAMILY_NAMES.get(lora.family, lora.family)} models "
                f"({lora.family_clue}), but the loaded model is {FAMILY_NAMES.get(family, family)}; nothing was "
                f"changed.", fix=f"use a LoRA made for {FAMILY_NAMES.get(family, family)} models, or load a "
                                 f"{FAMILY_NAMES.get(lora.family, lora.family)} checkpoint")
        missing = [n for n in lora.layers if _normal(n) not in names] + list(getattr(lora, "strange", []))
        if len(missing) == len(lora.layers) + len(getattr(lora, "strange", [])):
            raise SdkitError(f"None of the {len(lora.layers)} layers of {lora.path.name} match this model "
                             f"(e.g. {missing[0]}); nothing was changed.",
                             fix="the LoRA is for another kind of model; use one made for this checkpoint's family")
        unmatched[lora.name] = missing
        for name, layer in lora.layers.items():
            where = names.get(_normal(name))
            if where is None:
                continue
            weight_shape = _module(pipe, where).weight.shape
            try:
                layer.delta(weight_shape)
            except (ValueError, RuntimeError, KeyError) as error:
                raise SdkitError(f"{lora.path.name}: layer {name} does not fit this model's {where[1]} "
                                 f"({list(weight_shape)}; {error}); nothing was changed.",
                                 fix="this LoRA was made for a model of another size; use one for this checkpoint")
            plan.setdefault(where, []).append((layer, weight))
    return plan, unmatched


def _module(pipe, where: tuple[str, str]) -> torch.nn.Module:
    return getattr(pipe, where[0]).get_submodule(where[1])


def _dora(weight: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor, strength: float) -> torch.Tensor:
    """DoRA: the changed weight's direction with the trained magnitude per input column, blended by strength."""
    changed = weight + delta
    norm = changed.transpose(0, 1).reshape(changed.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(changed.shape[1], *[1] * (changed.dim() - 1)).transpose(0, 1)
    changed = changed * (scale.float() / norm)
    return weight + strength * (changed - weight)


def apply(pipe, chosen: list[tuple[Lora, float]]) -> Applied:
    """Make exactly these LoRAs active, each at its weight (negative allowed); [] takes every LoRA off."""
    plan, unmatched = _plan(pipe, chosen)  # raises before any weight changes
    state = pipe.__dict__.setdefault("_sdkit_loras", {"originals": {}, "active": []})
    originals: dict[tuple[str, str], torch.Tensor] = state["originals"]
    with torch.no_grad():
        try:
            for where in list(originals):
                if where not in plan:  # no longer changed by any LoRA: its own weight back, bit for bit
                    _module(pipe, where).weight.copy_(originals.pop(where))
            for where, layers in plan.items():
                param = _module(pipe, where).weight
                if where not in originals:
                    originals[where] = param.detach().clone()
                merged = originals[where].float()
                for layer, weight in layers:
                    delta = layer.delta(param.shape)
                    if "dora_scale" in layer.tensors:
                        merged = _dora(merged, delta, layer.tensors["dora_scale"], weight)
                    else:
                        merged = merged + weight * delta
                param.copy_(merged)
        except BaseException:  # out of memory, Ctrl-C, a bug: never leave a half-changed painter
            for where in list(originals):
                _module(pipe, where).weight.copy_(originals.pop(where))
            state["active"] = []
            raise
    state["active"] = [(lora.name, weight) for lora, weight in chosen]
    state["source"] = "apply"
    return Applied(changed=len(plan), unmatched=unmatched)


def remove(pipe) -> None:
    """Take every LoRA off: each changed weight gets its original back, bit for bit."""
    apply(pipe, [])


def active(pipe) -> list[tuple[str, float]]:
    """The LoRAs applied to this pipeline now, with their weights."""
    return list(pipe.__dict__.get("_sdkit_loras", {}).get("active", []))


# --- the prompt's <lora:NAME:WEIGHT> tags, as A1111 writes them ----------------------------------------------

TAG = re.compile(r"<(?:lora|lyco):([^:>]+)(?::([^:>]*))?(?::[^>]*)?>", re.IGNORECASE)
_loaded: dict[tuple[str, int, int], Lora] = {}


def tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(the prompt without its <lora:NAME:WEIGHT> tags, [(NAME, WEIGHT)]); a missing weight is 1."""
    found = []
    for match in TAG.finditer(prompt):
        name, weight = match.group(1).strip(), (match.group(2) or "1").strip()
        try:
            found.append((name, float(weight)))
        except ValueError:
            raise SdkitError(f"<lora:{name}:{weight}> has a weight that is not a number.",
                             fix=f"write it like <lora:{name}:0.8>") from None
    return TAG.sub("", prompt), found


def _cached(name: str, *, root: str | Path | None) -> Lora:
    """load(), remembered per file (a slider move re-applies without reading the file again)."""
    path = ModelPaths.from_root(root).find("loras", name)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _loaded:
        while len(_loaded) >= 8:
            _loaded.pop(next(iter(_loaded)))
        _loaded[key] = load(path)
    return _loaded[key]


def hashes(prompt: str, *, root: str | Path | None = None) -> str:
    """The "Lora hashes" text A1111 writes for a prompt's tags ("name: 0123456789ab, ..."), or ""."""
    return ", ".join(f"{name}: {_cached(name, root=root).shorthash}" for name, _ in tags(prompt)[1])


def from_prompt(pipe, prompt: str, *, root: str | Path | None = None) -> tuple[str, Applied | None]:
    """Apply the LoRAs a prompt's tags name (and take off those an earlier prompt's tags applied); the clean prompt.

    LoRAs applied by hand with apply() are left alone by a prompt without tags.
    """
    clean, wanted = tags(prompt)
    state = pipe.__dict__.get("_sdkit_loras", {})
    if not wanted and state.get("source") != "prompt":
        return clean, None
    chosen = [(_cached(name, root=root), weight) for name, weight in wanted]
    if [(lora.name, w) for lora, w in chosen] == state.get("active") and state.get("source") == "prompt":
        return clean, None  # already so: nothing to recompute
    result = apply(pipe, chosen)
    pipe.__dict__["_sdkit_loras"]["source"] = "prompt" if wanted else None
    return clean, result


def describe(lora: Lora) -> dict:
    """What `python -m sdkit info` says about a LoRA file."""
    kinds = sorted({layer.kind for layer in lora.layers.values()})
    dora = any("dora_scale" in layer.tensors for layer in lora.layers.values())
    ranks = [layer.tensors["down"].shape[0] for layer in lora.layers.values() if "down" in layer.tensors]
    names = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}
    return {"file": str(lora.path), "type": " + ".join(names[k] for k in kinds) + (" (DoRA)" if dora else ""),
            "family": lora.family or "unknown", "family_clue": lora.family_clue or "nothing in the file says",
            "layers": len(lora.layers), "rank": max(ranks) if ranks else None,
            "text_encoder": any(n.startswith(("lora_te", "text_encoder")) for n in lora.layers),
            "trigger_words": lora.trigger_words}


# --- the panel's LoRA controls ---------------------------------------------------------------------------------


def _set_tag(prompt: str, name: str, weight: float) -> str:
    """The prompt with this LoRA's tag at `weight`: an existing tag for it is rewritten, else one is appended."""
    tag = f"<lora:{name}:{weight:g}>"
    pattern = re.compile(rf"<(?:lora|lyco):{re.escape(name)}(?::[^>]*)?>", re.IGNORECASE)
    if pattern.search(prompt):
        return pattern.sub(tag, prompt, count=1)
    return f"{prompt} {tag}".strip()


def control_group(*, root: str | Path | None = None, name: str = "", weight: float = 1.0):
    """A panel group: pick a LoRA from the loras folder and turn its weight (-1 to 2); it rides in the prompt as the
    `<lora:NAME:WEIGHT>` tag A1111 writes, so the PNG and "Use" carry it."""
    import ipywidgets as w

    from sdkit.widgets import ControlGroup

    class LoraGroup(ControlGroup):
        title = "LoRA"

        def __init__(self) -> None:
            names = [Path(n).with_suffix("").as_posix() for n in ModelPaths.from_root(root).list("loras")]
            self.choice = w.Dropdown(options=[("(none)", "")] + [(n, n) for n in names],
                                     value=name if name in names else "", description="LoRA")
            self.weight = w.FloatSlider(value=weight, min=-1.0, max=2.0, step=0.05, description="weight",
                                        continuous_update=False)
            self.choice.add_class("sdkit-lora")
            self.weight.add_class("sdkit-lora-weight")
            self.widgets = [self.choice, self.weight]

        def update(self, settings):
            """The prompt with this LoRA's tag at the slider's weight (none chosen: unchanged)."""
            if not self.choice.value:
                return settings
            return settings.replace(prompt=_set_tag(settings.prompt, self.choice.value, self.weight.value))

        def show(self, settings) -> None:
            """The LoRA and weight of an earlier image's tag, if its LoRA is in the list."""
            options = [value for _, value in self.choice.options]
            for tag_name, tag_weight in tags(settings.prompt)[1]:
                if tag_name in options:
                    self.choice.value, self.weight.value = tag_name, max(-1.0, min(2.0, tag_weight))
                    return

    return LoraGroup()
