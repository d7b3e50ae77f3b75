"""Single-file checkpoint -> diffusers pipeline, offline, with the configs shipped in sdkit/configs/."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from sdkit import device, formats
from sdkit.errors import SdkitError
from sdkit.optimize import memory_format, prepare
from sdkit.paths import ModelPaths

CONFIGS = Path(__file__).resolve().parent / "configs"
TOKENIZERS = CONFIGS / "tokenizers"
OPT_OUTS = ("SDKIT_PACK", "SDKIT_FUSE")  # variables that change how a loaded UNet runs: part of the cache key
_cache: OrderedDict[tuple, object] = OrderedDict()

# Where each family keeps its text encoders in the original layout, and in which naming.
TEXT_ENCODERS = {
    "sd1": [("text_encoder", "cond_stage_model.transformer.text_model.", "clip_l")],
    "shapes": [("text_encoder", "cond_stage_model.transformer.text_model.", "clip_l")],
    "sd2": [("text_encoder", "cond_stage_model.model.", "open_clip")],
    "sdxl": [("text_encoder", "conditioner.embedders.0.transformer.text_model.", "clip_l"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "open_clip")],
}
LOADABLE = tuple(f for f in TEXT_ENCODERS if (CONFIGS / f).is_dir())
HEAD_DIM_64 = ("sd2", "sdxl")  # these families use 64-channel attention heads; SD1 uses 8 heads


@dataclass
class CheckpointInfo:
    """What sdkit knows about a loaded checkpoint; attached to the pipeline as `pipe.sdkit`."""

    name: str
    path: Path
    family: str
    autov2: str
    width: int
    height: int
    prediction: str
    dtypes: dict[str, str]


def _legacy_sd1(tensors: dict) -> dict:
    """Old SD1 files name the text encoder without `text_model.`; rename as A1111 does (in place, same dict)."""
    old = "cond_stage_model.transformer."
    if not any(k.startswith(tuple(old + part for part in ("embeddings.", "encoder.", "final_layer_norm.")))
               for k in tensors):
        return tensors
    for key in [k for k in tensors if k.startswith(old) and not k.startswith(old + "text_model.")]:
        tensors[old + "text_model." + key[len(old):]] = tensors.pop(key)
    return tensors


def _check_complete(specs: dict, *, path: Path, family: str) -> None:
    """Refuse files that lack a whole component, or whose UNet is not a text-to-image one."""
    names = list(specs)
    for component in ("unet", "vae", "text_encoder"):
        if component not in formats.components(names):
            prefix = formats.COMPONENT_PREFIXES[component][0]
            raise SdkitError(
                f"{path.name} has no {component} ({prefix}* tensors): it is not a full checkpoint "
                f"(pruned files sometimes leave out the VAE; a LoRA or VAE file has no UNet).",
                fix="use the full checkpoint; `python -m sdkit info FILE` shows which parts a file has",
            )
    channels = specs["model.diffusion_model.input_blocks.0.0.weight"].shape[1]
    if channels != 4:
        kind = {9: "an inpainting", 8: "an instruct-pix2pix"}.get(channels, f"a {channels}-channel")
        raise SdkitError(f"{path.name} is {kind} UNet ({channels} input channels); sdkit makes images from text "
                         f"with 4-channel UNets.", fix="use the text-to-image version of this checkpoint")


def memory_needed_gib(specs: dict[str, formats.TensorSpec], choices: dict[str, device.Choice]) -> float:
    """GiB the weights take once loaded in the chosen dtypes (counted from the file's tensor shapes)."""
    total = 0.0
    for name, spec in specs.items():
        part = next((c for c, prefixes in formats.COMPONENT_PREFIXES.items() if name.startswith(prefixes)), "unet")
        total += spec.numel * device.BYTES_PER_PARAMETER[choices[device.component_of(part)].dtype]
    return total / 2**30


def _check_fits(path: Path, specs: dict[str, formats.TensorSpec], choices: dict[str, device.Choice]) -> None:
    """Refuse, before loading anything, a model whose weights need more memory than is free."""
    import psutil

    need = memory_needed_gib(specs, choices)
    free = psutil.virtual_memory().available / 2**30
    if need > free:
        dtypes = ", ".join(sorted({c.dtype for c in choices.values()}))
        raise SdkitError(f"{path.name} needs about {need:.1f} GiB for its weights ({dtypes}), but only {free:.1f} GiB "
                         f"of memory is free.",
                         fix="close other programs, or use a smaller file (an fp8 or GGUF version, or a smaller family)")


def _count(names: list[str], pattern: str) -> int:
    """How many distinct indices the first group of `pattern` takes among `names`."""
    return len({m[1] for n in names if (m := re.match(pattern, n))})


def _unet_config(specs: dict[str, formats.TensorSpec], family: str) -> dict:
    """The UNet config values that the tensor shapes decide."""
    p = "model.diffusion_model."
    names = [k[len(p):] for k in specs if k.startswith(p)]
    shape = lambda name: specs[p + name].shape  # noqa: E731
    downs = sorted(int(m[1]) for n in names if (m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op\.weight", n)))
    per = downs[0] if downs else _count(names, r"input_blocks\.(\d+)\.") - 1
    levels = len(downs) + 1
    first = [per * i + 1 for i in range(levels)]
    channels = [shape(f"input_blocks.{b}.0.out_layers.3.weight")[0] for b in first]
    attention = [any(n.startswith(f"input_blocks.{b}.1.") for n in names) for b in first]
    depth = [max(1, _count(names, rf"input_blocks\.{b}\.1\.transformer_blocks\.(\d+)\.")) for b in first]
    context = next(shape(n)[1] for n in names if n.endswith("attn2.to_k.weight"))
    config = {
        "in_channels": shape("input_blocks.0.0.weight")[1],
        "block_out_channels": channels,
        "layers_per_block": per - 1,
        "cross_attention_dim": context,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "use_linear_projection": any(len(shape(n)) == 2 for n in names if n.endswith(".proj_in.weight")),
        "attention_head_dim": [max(1, c // 64) for c in channels] if family in HEAD_DIM_64 else 8,
    }
    if "out.2.weight" in names:  # a ControlNet is the UNet's encoder only
        config["out_channels"] = shape("out.2.weight")[0]
    if family == "sdxl" or max(depth) > 1:
        config["transformer_layers_per_block"] = depth
    if "label_emb.0.0.weight" in names:
        config["projection_class_embeddings_input_dim"] = shape("label_emb.0.0.weight")[1]
    return config


def _vae_config(specs: dict[str, formats.TensorSpec]) -> dict:
    """The VAE config values that the tensor shapes decide."""
    p = "first_stage_model."
    names = [k[len(p):] for k in specs if k.startswith(p)]
    levels = _count(names, r"encoder\.down\.(\d+)\.")
    return {
        "in_channels": specs[p + "encoder.conv_in.weight"].shape[1],
        "out_channels": specs[p + "decoder.conv_out.weight"].shape[0],
        "latent_channels": specs[p + "post_quant_conv.weight"].shape[0],
        "block_out_channels": [specs[p + f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)],
        "layers_per_block": _count(names, r"encoder\.down\.0\.block\.(\d+)\."),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


def _text_config(specs: dict[str, formats.TensorSpec], *, prefix: str, naming: str, family: str) -> dict:
    """The text-encoder config values that the tensor shapes decide."""
    names = [k[len(prefix):] for k in specs if k.startswith(prefix)]
    if naming == "clip_l":
        vocab, hidden = specs[prefix + "embeddings.token_embedding.weight"].shape
        positions = specs[prefix + "embeddings.position_embedding.weight"].shape[0]
        layers = _count(names, r"encoder\.layers\.(\d+)\.")
        inner = specs[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        projection = None
    else:
        vocab, hidden = specs[prefix + "token_embedding.weight"].shape
        positions = specs[prefix + "positional_embedding"].shape[0]
        layers = _count(names, r"transformer\.resblocks\.(\d+)\.")
        layers -= family == "sd2" and layers == 24  # SD2 uses the penultimate layer; its last one is never run
        inner = specs[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        projection = specs[prefix + "text_projection"].shape[1] if prefix + "text_projection" in specs else None
    config = {"vocab_size": vocab, "hidden_size": hidden, "max_position_embeddings": positions,
              "num_hidden_layers": layers, "intermediate_size": inner, "num_attention_heads": max(1, hidden // 64)}
    if projection:
        config["projection_dim"] = projection
    return config


def config_dir(specs: dict[str, formats.TensorSpec], family: str) -> Path:
    """The shipped config folder of `family`, or a copy adjusted to the shapes found in the file."""
    base = CONFIGS / family
    try:
        overrides = {"unet": _unet_config(specs, family), "vae": _vae_config(specs)}
        for subfolder, prefix, naming in TEXT_ENCODERS[family]:
            overrides[subfolder] = _text_config(specs, prefix=prefix, naming=naming, family=family)
    except (KeyError, StopIteration, IndexError) as error:
        raise SdkitError(
            f"This {family} checkpoint lacks tensors every {family} model has (missing: {error}).",
            fix="the file is damaged or only part of a checkpoint (a LoRA or VAE?); check what it is with `python -m sdkit info`",
        ) from None
    if family == "sdxl":  # the UNet's extra input is 6 size/crop embeddings plus the second encoder's pooled output
        extra = overrides["unet"]["projection_class_embeddings_input_dim"] - overrides["text_encoder_2"]["projection_dim"]
        overrides["unet"]["addition_time_embed_dim"] = extra // 6
    changed = {}
    for subfolder, values in overrides.items():
        config = json.loads((base / subfolder / "config.json").read_text())
        if any(config.get(k) != v for k, v in values.items()):
            changed[subfolder] = config | values
    if not changed:
        return base
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / "sdkit-configs" / f"{family}-{digest}"
    if not target.exists():
        staging = Path(tempfile.mkdtemp(prefix=f"{family}-", dir=target.parent if target.parent.exists() else None))
        shutil.copytree(base, staging, dirs_exist_ok=True)
        for subfolder, config in changed.items():
            (staging / subfolder / "config.json").write_text(json.dumps(config, indent=2))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(target)
        except OSError:  # another process made it first: same content
            shutil.rmtree(staging, ignore_errors=True)
    return target


def from_shipped_config(family: str, subfolder: str):
    """A freshly initialised (random) model of one part of `family`, built from the config sdkit ships."""
    config = json.loads((CONFIGS / family / subfolder / "config.json").read_text())
    if subfolder.startswith("text_encoder"):
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        cls = CLIPTextModelWithProjection if subfolder == "text_encoder_2" else CLIPTextModel
        return cls(CLIPTextConfig(**config))
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


def _tokenizer(variant: str):
    """The CLIP tokenizer shipped in sdkit/configs/tokenizers (clip_l pads with <|endoftext|>, open_clip with '!')."""
    from transformers import CLIPTokenizer

    bpe = TOKENIZERS / "clip_bpe"
    return CLIPTokenizer.from_pretrained(
        str(TOKENIZERS / variant), vocab_file=str(bpe / "vocab.json"), merges_file=str(bpe / "merges.txt")
    )


def _check_loaded(model, *, part: str, path: Path) -> None:
    """Refuse a model some of whose weights were missing from the file."""
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise SdkitError(
            f"{path}: the {part} is incomplete, {len(missing)} weights are missing (e.g. {', '.join(missing[:3])}).",
            fix="the file is damaged or only partly a checkpoint; download it again",
        )


def _prediction(family: str, specs: dict, metadata: dict[str, str]) -> str:
    """epsilon or v_prediction: from the file's metadata or keys, else the family's usual choice."""
    declared = metadata.get("modelspec.prediction_type", "")
    if declared:
        return "v_prediction" if declared.startswith("v") else "epsilon"
    if "v_pred" in specs:
        return "v_prediction"
    return "v_prediction" if family == "sd2" else "epsilon"


def _fill(model, state: dict, *, dtype, layout, release, path: Path, part: str) -> None:
    """Move converted tensors into `model` (built on the meta device) one at a time, cast to `dtype`.

    Each tensor is copied, popped and its file pages released before the next: from a memory-mapped safetensors
    file, memory holds the finished weights plus one tensor, never the file's copy and the converted copy side by
    side. 4-D weights are created in `layout` (channels-last for convolutions on a CPU): no later step copies them.
    """
    import torch

    expected = model.state_dict(keep_vars=True)  # what a checkpoint holds: no non-persistent buffers (position ids)
    for name in list(state):
        tensor = state.pop(name)
        if name not in expected or tensor is None:  # None: a converter's .get() of a missing key; reported later
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise SdkitError(f"{path.name}: the {part} weight {name} is {list(tensor.shape)} in the file, but this "
                             f"{part} needs {list(expected[name].shape)}.",
                             fix="the file mixes parts of different models or is damaged; use another file")
        if formats.nonfinite(tensor):
            raise SdkitError(f"{path.name}: the {part} weight {name} holds NaN or infinite values; the file is damaged "
                             f"or was merged badly, and would paint black pictures.",
                             fix="download the file again, or use another version of the checkpoint")
        target = dtype if tensor.is_floating_point() else tensor.dtype
        value = torch.empty(tensor.shape, dtype=target,
                            memory_format=layout if tensor.dim() == 4 else torch.contiguous_format).copy_(tensor)
        release(tensor.data_ptr(), tensor.nbytes)
        del tensor
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value


def _take(state: dict, prefixes: tuple[str, ...]) -> dict:
    """Pop the tensors whose names start with one of `prefixes` out of `state`."""
    return {k: state.pop(k) for k in [k for k in state if k.startswith(prefixes)]}


def _component(part: str, state: dict, *, config: str, family: str, choice: device.Choice, release, path: Path):
    """One diffusers/transformers component from its original-layout tensors (popped out of `state`)."""
    from accelerate import init_empty_weights
    from diffusers.loaders import single_file_utils as ldm

    if part in ("unet", "vae"):
        import diffusers

        cls = diffusers.UNet2DConditionModel if part == "unet" else diffusers.AutoencoderKL
        settings = cls.load_config(config, subfolder=part, local_files_only=True)
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(settings)
        ours = _take(state, formats.COMPONENT_PREFIXES[part])
        convert = ldm.convert_ldm_unet_checkpoint if part == "unet" else ldm.convert_ldm_vae_checkpoint
        converted = convert(ours, config=settings)
    else:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        _, prefix, naming = next(t for t in TEXT_ENCODERS[family] if t[0] == part)
        cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
        with init_empty_weights(include_buffers=False):
            model = cls(CLIPTextConfig.from_pretrained(config, subfolder=part, local_files_only=True))
        ours = _take(state, (prefix.removesuffix("text_model."),))
        if naming == "clip_l":
            converted = ldm.convert_ldm_clip_checkpoint(ours, remove_prefix=prefix.removesuffix("text_model."))
        else:
            converted = ldm.convert_open_clip_checkpoint(model, ours, prefix=prefix)
        if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    spans = [(t.data_ptr(), t.nbytes) for t in ours.values()]
    ours.clear()  # the converted dict holds what is still needed; originals of loaded pickles are freed as they go
    which = device.component_of(part)
    _fill(model, converted, dtype=choice.torch_dtype, layout=memory_format(part=which, choice=choice), release=release,
          path=path, part=part)
    for pointer, size in spans:
        release(pointer, size)  # pages read only to be split (open_clip's q/k/v) or skipped
    return model


def _build(path: Path, *, family: str, specs: dict, metadata: dict[str, str], state: dict | None,
           prediction: str | None):
    """Convert the file's tensors into diffusers components, one at a time, and assemble the pipeline."""
    import torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # diffusers' pipeline imports warn about image processors we never use
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    transformers_logging.set_verbosity_warning()

    config = str(config_dir(specs, family))
    choices = device.choose(device.report())
    state = state if state is not None else formats.load_state_dict(path)
    release = getattr(state, "release", lambda pointer, size: None)  # memory-mapped safetensors hand pages back
    state = _legacy_sd1(state)
    parts = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for subfolder, _, naming in TEXT_ENCODERS[family]:  # smallest first: the peak comes with the last part
            parts[subfolder] = _component(subfolder, state, config=config, family=family,
                                          choice=choices["text_encoder"], release=release, path=path)
            parts[subfolder.replace("text_encoder", "tokenizer")] = _tokenizer(naming)
        for part in ("vae", "unet"):
            parts[part] = _component(part, state, config=config, family=family, choice=choices[part],
                                     release=release, path=path)
    del state
    for part, model in parts.items():
        if isinstance(model, torch.nn.Module):
            _check_loaded(model, part=part, path=path)
            which = device.component_of(part)
            parts[part] = prepare(model, part=which, choice=choices[which])
    prediction = prediction or _prediction(family, specs, metadata)
    scheduler = EulerDiscreteScheduler.from_pretrained(config, subfolder="scheduler", prediction_type=prediction)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(scheduler=scheduler, **parts)
    else:
        pipe = StableDiffusionPipeline(scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe, prediction, {k: str(v.dtype).removeprefix("torch.") for k, v in parts.items() if hasattr(v, "dtype")}


def is_loaded(path: Path) -> bool:
    """Whether load() would return this file's pipeline from memory (no load needed)."""
    return any(key[0] == str(Path(path).resolve()) for key in _cache)


def load(name_or_path: str | Path, *, root: str | Path | None = None, family: str | None = None,
         prediction: str | None = None):
    """Load a single-file checkpoint (by name in models/checkpoints or by path) as a diffusers pipeline, offline.

    The same file loaded twice returns the same pipeline object (cached); `pipe.sdkit` says what it is.
    `prediction` ('epsilon' or 'v_prediction') overrides the guess for SD2 files, which do not say.
    """
    if prediction not in (None, "epsilon", "v_prediction"):
        raise SdkitError(f"prediction={prediction!r} is unknown.", fix="use 'epsilon' or 'v_prediction'")
    path = ModelPaths.from_root(root).find("checkpoints", name_or_path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, family, prediction,
           str(device.choose(device.report())), *(os.environ.get(name) for name in OPT_OUTS))
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    state = None
    if formats.file_format(path) == "pickle":  # read once: the tensors are needed for the specs anyway
        state = formats.load_pickle(path)
        specs, metadata = {k: formats.TensorSpec(str(v.dtype).removeprefix("torch."), tuple(v.shape))
                           for k, v in state.items()}, {}
    else:
        specs, metadata = formats.read_specs(path)
    specs = _legacy_sd1(specs)
    family = family or formats.detect_family(specs, metadata)
    if family not in LOADABLE:
        raise SdkitError(
            f"{path.name} is a {family} checkpoint; sdkit loads {', '.join(LOADABLE)} checkpoints so far.",
            fix="use an SD1.x, SD2.x or SDXL single-file checkpoint",
        )
    _check_complete(specs, path=path, family=family)
    _check_fits(path, specs, device.choose(device.report()))
    _cache.clear()  # one pipeline at a time: a second SDXL in memory is what runs a laptop out of RAM
    device.return_free_memory()
    pipe, prediction, dtypes = _build(path, family=family, specs=specs, metadata=metadata, state=state,
                                      prediction=prediction)
    device.return_free_memory()
    size = formats.NATIVE_SIZE[family] if family != "sd2" or prediction == "v_prediction" else 512
    pipe.sdkit = CheckpointInfo(name=path.name, path=path, family=family, autov2=formats.autov2(path), width=size,
                                height=size, prediction=prediction, dtypes=dtypes)
    _cache[key] = pipe
    return pipe
