"""VAEs: the part that turns the UNet's latents into pixels (colour and final detail), swapped, tiny or tiled.

    other = vae.load("my-vae")            # models/vae/my-vae.safetensors (or a path): full VAE or tiny decoder
    vae.apply(pipe, other)                # the pipeline now decodes with it (and encodes, for a full VAE)
    vae.restore(pipe)                     # the checkpoint's own VAE back, bit for bit
    images = vae.decode(pipe, latents, tiled=True)   # bounded memory for large pictures

Files: single-file VAEs in the original layout (`encoder.down.0.block.0...`, with or without `first_stage_model.`),
the diffusers layout (`encoder.down_blocks.0.resnets.0...`), `.pt`/`.ckpt` through `weights_only`; tiny decoders
in TAESD's own layout (`taesd_decoder.pth`: a numbered nn.Sequential, as ComfyUI's vae_approx folder keeps them)
and diffusers' `AutoencoderTiny` layout. The model is built from the tensor shapes, as the checkpoint loader does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdkit import allocator, formats
from sdkit.errors import SdkitError
from sdkit.paths import ModelPaths

TILE_LATENT = 64  # latent pixels per tile (512 image pixels at 8x), as diffusers' tiled decode uses
TILED_ABOVE = 1024 * 1024  # image pixels above which decode() tiles by default: a whole 1024² SDXL decode takes GBs
# The tiny decoder each family's preview looks for in the vae_approx folder (ComfyUI's file names).
TINY_NAMES = {"sd1": "taesd_decoder", "sd2": "taesd_decoder", "sdxl": "taesdxl_decoder", "shapes": "taesd_shapes_decoder"}
TEST_PATCH = 8  # latents per side of each colour patch in the compatibility test picture
COMPATIBLE_CORRELATION = 0.9  # of patch colours with the checkpoint's own VAE: under it, another latent language


@dataclass
class Vae:
    """A VAE file, read and built: a full AutoencoderKL, or a tiny decoder (AutoencoderTiny, decode only)."""

    name: str
    path: Path
    model: torch.nn.Module
    kind: str  # "full" or "tiny"
    metadata: dict[str, str] = field(default_factory=dict)  # the safetensors header's, if any

    @property
    def latent_channels(self) -> int:
        """How many channels of latents it reads (4 for SD1/SD2/SDXL, 16 for SD3/FLUX)."""
        return int(self.model.config.latent_channels)


# --- reading files -------------------------------------------------------------------------------------------------


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the file, `first_stage_model.`/`vae.` prefixes dropped, and its metadata."""
    state, metadata = formats.read_tensors(path)
    for prefix in ("first_stage_model.", "vae."):
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return state, metadata


def _norm_groups(metadata: dict[str, str], *, path: Path, widths: list[int]) -> int:
    """GroupNorm's group count, which no tensor shape shows: 32 in every SD/SDXL/SD3/FLUX VAE; the shapes world's
    own VAEs say what they are in their metadata (`modelspec.architecture`) and take its shipped config's."""
    groups = 32
    if metadata.get("modelspec.architecture", "").startswith("sdkit-shapes"):
        import json

        from sdkit.checkpoints import CONFIGS

        groups = json.loads((CONFIGS / "shapes" / "vae" / "config.json").read_text())["norm_num_groups"]
    if any(w % groups for w in widths):
        raise SdkitError(f"{path.name} has VAE widths {widths}, which do not split into the {groups} normalisation "
                         f"groups a VAE of this kind uses.", fix="the file is not a VAE sdkit knows; use one made for SD models")
    return groups


def _count(names, pattern: str) -> int:
    """1 + the largest number the pattern's group takes in `names` (0 if none)."""
    found = [int(m.group(1)) for n in names if (m := re.match(pattern, n))]
    return max(found) + 1 if found else 0


def _full(state: dict[str, torch.Tensor], *, path: Path, metadata: dict[str, str]) -> torch.nn.Module:
    """An AutoencoderKL from original-layout or diffusers-layout tensors."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    original = "encoder.down.0.block.0.conv1.weight" in state
    if original:
        levels = _count(state, r"encoder\.down\.(\d+)\.")
        widths = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
        per_block = _count(state, r"encoder\.down\.0\.block\.(\d+)\.")
        latent = state["post_quant_conv.weight"].shape[0] if "post_quant_conv.weight" in state else state[
            "decoder.conv_in.weight"].shape[1]
    else:
        levels = _count(state, r"encoder\.down_blocks\.(\d+)\.")
        widths = [state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
        per_block = _count(state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
        latent = state["decoder.conv_in.weight"].shape[1]
    config = {"in_channels": state["encoder.conv_in.weight"].shape[1],
              "out_channels": state["decoder.conv_out.weight"].shape[0], "latent_channels": latent,
              "block_out_channels": widths, "layers_per_block": per_block,
              "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
              "use_quant_conv": "quant_conv.weight" in state, "use_post_quant_conv": "post_quant_conv.weight" in state,
              "norm_num_groups": _norm_groups(metadata, path=path, widths=widths)}
    model = AutoencoderKL.from_config(config)
    weights = convert_ldm_vae_checkpoint(state, config=dict(model.config)) if original else state
    _load(model, weights, path=path)
    return model


def _tiny(state: dict[str, torch.Tensor], *, path: Path) -> torch.nn.Module:
    """An AutoencoderTiny (decoder only) from TAESD's numbered layout or diffusers' `decoder.layers.N` layout."""
    from diffusers import AutoencoderTiny

    if any(k.startswith("decoder.layers.") for k in state):
        layers = {k.removeprefix("decoder.layers."): v for k, v in state.items() if k.startswith("decoder.layers.")}
    else:  # TAESD: index 0 is the Clamp, which diffusers applies in forward() instead of as a layer
        layers = {f"{int(k.split('.')[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in state.items()}
    index = sorted({int(k.split(".")[0]) for k in layers})
    blocks, groups = 0, []
    for i in index[1:]:  # after conv_in: runs of blocks, each run closed by a conv (the last one with a bias)
        if f"{i}.conv.0.weight" in layers:
            blocks += 1
        else:
            groups.append(blocks)
            blocks = 0
    width = layers[f"{index[0]}.weight"].shape[0]
    config = {"latent_channels": layers[f"{index[0]}.weight"].shape[1], "decoder_block_out_channels": [width] * len(groups),
              "num_decoder_blocks": groups, "out_channels": layers[f"{index[-1]}.weight"].shape[0],
              "encoder_block_out_channels": [width] * len(groups), "num_encoder_blocks": [1] * len(groups)}
    model = AutoencoderTiny.from_config(config)
    model.encoder = None  # decode only: these files carry no encoder
    _load(model.decoder, {f"layers.{k}": v for k, v in layers.items()}, path=path)
    return model


def _load(model: torch.nn.Module, state: dict[str, torch.Tensor], *, path: Path) -> None:
    """Load tensors strictly, as one line naming the file when they do not fit."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = re.sub(r"\s+", " ", str(error))[:300]
        raise SdkitError(f"{path.name} looks like a VAE but its tensors do not fit one: {detail}",
                         fix="the file is damaged or of a kind sdkit does not read; download it again") from None


def _kind(state: dict[str, torch.Tensor]) -> str | None:
    """'full', 'tiny' or None (not a VAE), from the tensor names."""
    if "encoder.conv_in.weight" in state and "decoder.conv_out.weight" in state:
        return "full"
    if any(k.startswith("decoder.layers.") for k in state) or (state and all(re.match(r"\d+\.", k) for k in state)):
        return "tiny"
    return None


def _looks_like(names: list[str]) -> str:
    """What a file that is not a VAE seems to be, from its tensor names."""
    if any(n.startswith(("lora_", "lycoris_")) or ".lora_" in n or ".hada_" in n for n in names):
        return "a LoRA"
    if {"emb_params", "string_to_param", "clip_l"} & set(names):
        return "an embedding"
    found = formats.components(names)
    return f"a model with {', '.join(found)}" if found else "none of the kinds sdkit knows"


def load(name_or_path: str | Path, *, root: str | Path | None = None) -> Vae:
    """Read a VAE or tiny decoder (by name in the vae or vae_approx folders, or a path); nothing is applied yet."""
    registry = ModelPaths.from_root(root)
    try:
        path = registry.find("vae", name_or_path)
    except SdkitError:
        path = registry.find("vae_approx", name_or_path)
    state, metadata = _tensors(path)
    kind = _kind(state)
    if kind is None:
        raise SdkitError(f"{path.name} is not a VAE: it has no encoder/decoder tensors (it looks like "
                         f"{_looks_like(list(state))}; first tensor {next(iter(state), 'none')!r}).",
                         fix="put VAE files (e.g. vae-ft-mse-840000-ema-pruned.safetensors, taesd_decoder.pth) in "
                             "models/vae, and checkpoints, LoRAs and others in their own folders")
    with torch.no_grad():
        model = _full(state, path=path, metadata=metadata) if kind == "full" else _tiny(state, path=path)
    return Vae(name=path.stem, path=path, model=model.eval().requires_grad_(False), kind=kind, metadata=metadata)


def describe(chosen: Vae) -> dict:
    """What `python -m sdkit info` says about a VAE file."""
    config = chosen.model.config
    widths = config.block_out_channels if chosen.kind == "full" else config.decoder_block_out_channels
    return {"file": str(chosen.path), "type": "VAE" if chosen.kind == "full" else "tiny decoder (TAESD)",
            "latent_channels": chosen.latent_channels,
            "for": ("the shapes world (its metadata says so)" if chosen.metadata.get("modelspec.architecture", "")
                    .startswith("sdkit-shapes") else _latent_family(chosen.latent_channels)),
            "widths": [str(w) for w in widths], "parameters": sum(p.numel() for p in chosen.model.parameters())}


# --- swapping ------------------------------------------------------------------------------------------------------


def _test_latents(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed test picture (flat patches of red, green, blue, yellow, white and black, the colours every VAE must
    get right, each 8x8 latents: large enough to be ordinary picture content), its latents from the pipeline's own
    VAE and that VAE's decode of them."""
    own = original(pipe)
    factor = 2 ** (len(own.config.block_out_channels) - 1)
    colours = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [1, 1, 1], [-1, -1, -1]],
                           dtype=torch.float32)
    patches = colours.reshape(2, 3, 3).permute(2, 0, 1)  # 2 rows x 3 columns of colours
    picture = patches.repeat_interleave(TEST_PATCH * factor, 1).repeat_interleave(TEST_PATCH * factor, 2)[None]
    with torch.no_grad():
        latents = own.encode(picture.to(own.device, own.dtype)).latent_dist.mean
        reference = own.decode(latents).sample.float()
    return latents * own.config.scaling_factor, reference


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two pictures in [-1, 1]."""
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean())
    return 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item()


def original(pipe) -> torch.nn.Module:
    """The checkpoint's own VAE (whatever is applied now)."""
    return pipe.__dict__.get("_sdkit_vae_original", pipe.vae)


def check(pipe, chosen: Vae) -> float:
    """Refuse a VAE that cannot decode this pipeline's latents; returns how close it comes to the checkpoint's own
    VAE (PSNR in dB of a test picture's patch colours; a colour grade lowers it, another latent space is refused)."""
    own = original(pipe)
    mine, theirs = int(own.config.latent_channels), chosen.latent_channels
    family = getattr(getattr(pipe, "sdkit", None), "family", "this model")
    if mine != theirs:
        raise SdkitError(f"{chosen.path.name} reads {theirs}-channel latents ({_latent_family(theirs)}), but "
                         f"{family} makes {mine}-channel ones ({_latent_family(mine)}); nothing was changed.",
                         fix=f"use a VAE made for {family} models")
    latents, reference = _test_latents(pipe)
    model = _prepared(chosen.model)  # as apply() will run it (this machine's VAE dtype and layout)
    latents = latents.to(model.dtype)
    with torch.no_grad():
        # A full VAE decodes with the checkpoint's scaling factor, as apply() and A1111 set it.
        decoded = model.decode(latents / own.config.scaling_factor if chosen.kind == "full" else latents).sample
    pool = torch.nn.functional.adaptive_avg_pool2d  # each patch's mean colour: the latent language, not fine detail
    mine_colours, own_colours = pool(decoded.float(), (2, 3)), pool(reference, (2, 3))
    score = _psnr(mine_colours, own_colours)
    # A VAE for this latent space may grade colours its own way (warmer, paler, more vivid) but keeps them apart
    # as the model's own does; one for another latent space scrambles them. So: correlation of the patch colours.
    agree = float(torch.corrcoef(torch.stack([mine_colours.flatten(), own_colours.flatten()]))[0, 1].nan_to_num(0.0))
    if agree < COMPATIBLE_CORRELATION:
        raise SdkitError(f"{chosen.path.name} decodes {family}'s latents into other colours (on a test picture of six "
                         f"colour patches its colours correlate {agree:.2f} with the checkpoint's own VAE's; a VAE for "
                         f"this model keeps them above {COMPATIBLE_CORRELATION}): it was made for another model, e.g. "
                         f"an SDXL VAE on SD1.5; nothing was changed.", fix=f"use a VAE made for {family} models")
    return score


def _latent_family(channels: int) -> str:
    """Which models make latents with this many channels."""
    return {4: "SD1.x, SD2.x and SDXL", 16: "SD3 and FLUX"}.get(channels, "another kind of model")


def apply(pipe, chosen: Vae) -> float:
    """Decode (and, for a full VAE, encode) with `chosen` from now on, after check(); returns check()'s PSNR."""
    score = check(pipe, chosen)
    own = original(pipe)
    pipe.__dict__.setdefault("_sdkit_vae_original", own)
    model = _prepared(chosen.model)
    if chosen.kind == "full":
        model.register_to_config(scaling_factor=own.config.scaling_factor)  # the checkpoint's, as A1111 keeps it
    pipe.vae = model
    pipe.__dict__["_sdkit_vae_name"] = chosen.name
    pipe.__dict__["_sdkit_vae_hash"] = formats.sha256(chosen.path)[:10]  # A1111's "VAE hash"
    return score


def _prepared(model: torch.nn.Module) -> torch.nn.Module:
    """A VAE or tiny decoder in this machine's VAE dtype and layout (bf16 and channels-last where they measure
    faster), as the checkpoint loader prepares the checkpoint's own."""
    from sdkit import device
    from sdkit.optimize import prepare

    return prepare(model, part="vae", choice=device.choose(device.report())["vae"])


def restore(pipe) -> None:
    """The checkpoint's own VAE back (the same object, so the same pixels)."""
    own = pipe.__dict__.pop("_sdkit_vae_original", None)
    if own is not None:
        pipe.vae = own
    pipe.__dict__.pop("_sdkit_vae_name", None)
    pipe.__dict__.pop("_sdkit_vae_hash", None)


def tiny_for(pipe, *, root: str | Path | None = None) -> Vae | None:
    """The tiny decoder for this pipeline's family from the vae_approx folder (TAESD's file names), or None; read
    once per pipeline."""
    cache = pipe.__dict__.setdefault("_sdkit_tiny_decoder", {})
    if root not in cache:
        family = getattr(getattr(pipe, "sdkit", None), "family", "sd1")
        found = None
        name = TINY_NAMES.get(family)
        if name:
            try:
                found = load(ModelPaths.from_root(root).find("vae_approx", name))
                found.model = _prepared(found.model)
            except SdkitError:
                found = None
        cache[root] = found
    return cache[root]


def active(pipe) -> str:
    """The name of the VAE in use, or "" for the checkpoint's own."""
    return pipe.__dict__.get("_sdkit_vae_name", "")


def parameters(pipe) -> dict[str, str]:
    """The "VAE" and "VAE hash" entries A1111 writes into a picture's text when a VAE is swapped in."""
    name = active(pipe)
    return {"VAE": name, "VAE hash": pipe.__dict__["_sdkit_vae_hash"]} if name else {}


# --- decoding ------------------------------------------------------------------------------------------------------


def _run(vae, latents: torch.Tensor, *, tiled: bool) -> torch.Tensor:
    """One decode, whole or tiled (diffusers' tiled decode: overlapping tiles, blended seams)."""
    if tiled and hasattr(vae, "tiled_decode"):
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        vae.tile_latent_min_size = TILE_LATENT
        vae.tile_sample_min_size = TILE_LATENT * factor
        return vae.tiled_decode(latents).sample
    return vae.decode(latents).sample


def decode(pipe, latents: torch.Tensor, *, tiled: bool | None = None, notes: list[str] | None = None):
    """Latents -> PIL images through the pipeline's VAE at its dtype; tiled above 1024² image pixels unless told.

    When a reduced-precision decode gives NaN or inf (SDXL's VAE in fp16 is known for it), the decode runs again in
    fp32 and a note says so, instead of a black picture."""
    vae = pipe.vae
    scale = getattr(vae.config, "scaling_factor", 1.0)
    factor = getattr(pipe, "vae_scale_factor", 8)
    if tiled is None:
        tiled = latents.shape[-1] * latents.shape[-2] * factor * factor > TILED_ABOVE
    allocator.trim()  # the UNet steps' freed memory goes back before the decoder's, a picture's largest, is made
    with torch.inference_mode():
        pixels = _run(vae, latents.to(vae.device, vae.dtype) / scale, tiled=tiled)
        if not torch.isfinite(pixels).all() and vae.dtype != torch.float32:
            dtype = str(vae.dtype).removeprefix("torch.")
            vae.float()
            try:
                pixels = _run(vae, latents.to(vae.device, torch.float32) / scale, tiled=tiled)
            finally:
                vae.to(getattr(torch, dtype))
            if notes is not None:
                notes.append(f"The VAE gave NaN/inf pixels in {dtype}; this picture was decoded again in fp32.")
    if not torch.isfinite(pixels).all():
        raise SdkitError("The VAE produced NaN/inf pixels even in fp32: the picture would be black.",
                         fix="the VAE or the latents are broken: try the checkpoint's own VAE (vae.restore) or "
                             "another seed")
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


def encode(pipe, pictures: list) -> torch.Tensor:
    """Pictures (PIL, the model's size) -> latents as the UNet makes them: the checkpoint's own VAE, posterior mean,
    times its scaling factor."""
    import numpy as np

    own = original(pipe)
    pixels = torch.from_numpy(np.stack([np.asarray(p.convert("RGB")) for p in pictures])).permute(0, 3, 1, 2)
    with torch.inference_mode():
        latents = own.encode(pixels.to(own.device, own.dtype) / 127.5 - 1).latent_dist.mean
    return latents * own.config.scaling_factor


def decode_with(pipe, chosen: Vae | None, latents: torch.Tensor) -> list:
    """Latents -> PIL pictures through `chosen` (None: the checkpoint's own VAE), without applying it: the
    pipeline decodes as before."""
    own = original(pipe)
    model = own if chosen is None else _prepared(chosen.model)
    scale = own.config.scaling_factor if chosen is None or chosen.kind == "full" else 1.0
    with torch.inference_mode():
        pixels = model.decode(latents.to(model.device, model.dtype) / scale).sample
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


# --- the panel -----------------------------------------------------------------------------------------------------


def control_group(*, root: str | Path | None = None, name: str = ""):
    """A panel group: which VAE decodes the pictures: the checkpoint's own, a file from the vae folder, or a tiny
    decoder from vae_approx (fast, a little less exact). A VAE that does not fit the model is refused by name."""
    import ipywidgets as w

    from sdkit.widgets import ControlGroup

    registry = ModelPaths.from_root(root)
    options = [("(the checkpoint's own)", "")]
    options += [(Path(n).stem, Path(n).stem) for n in registry.list("vae")]
    options += [(f"{Path(n).stem} (tiny decoder)", Path(n).stem) for n in registry.list("vae_approx")]
    loaded: dict[str, Vae] = {}

    class VaeGroup(ControlGroup):
        title = "VAE"

        def __init__(self) -> None:
            values = [v for _, v in options]
            self.choice = w.Dropdown(options=options, value=name if name in values else "", description="VAE")
            self.choice.add_class("sdkit-vae")
            self.widgets = [self.choice]

        def prepare(self, pipe, settings) -> None:
            """Decode with the chosen VAE (loaded once), or the checkpoint's own again."""
            chosen = self.choice.value
            if not chosen:
                restore(pipe)
            elif active(pipe) != chosen:
                if chosen not in loaded:
                    loaded[chosen] = load(chosen, root=root)
                apply(pipe, loaded[chosen])

        def show(self, settings) -> None:
            """An earlier picture's VAE (its `VAE` field) back into the dropdown."""
            used = settings.extra.get("VAE", "")
            if used in [v for _, v in options]:
                self.choice.value = used

    return VaeGroup()
