"""diffusers/transformers state dicts -> the original single-file (LDM / A1111 / ComfyUI) key layout."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

Tensors = dict[str, torch.Tensor]

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP = {"conv_norm_out": "norm_out"}


def _rename(state: Tensors, rename: Callable[[str], str]) -> Tensors:
    """Apply a key renaming to every tensor, failing loudly on a key it does not know."""
    return {rename(key): value for key, value in state.items()}


def _unet_key(key: str, *, per: int, up_attentions: list[bool]) -> str:
    """The LDM name (without prefix) of one diffusers UNet or ControlNet-encoder key."""
    for old, new in UNET_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return _block(f"input_blocks.{per * i + j + 1}", kind, rest)
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{per * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return _block(f"output_blocks.{per * i + j}", kind, rest)
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        i = int(m[1])
        return f"output_blocks.{per * i + per - 1}.{2 if up_attentions[i] else 1}.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return _block(f"middle_block.{2 * int(m[1])}", "resnets", m[2], slot="")
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def unet_to_ldm(state: Tensors, *, layers_per_block: int, up_attentions: list[bool]) -> Tensors:
    """A diffusers UNet2DConditionModel state dict in LDM `model.diffusion_model.*` names."""
    per = layers_per_block + 1
    rename = lambda key: _unet_key(key, per=per, up_attentions=up_attentions)  # noqa: E731
    return {"model.diffusion_model." + k: v for k, v in _rename(state, rename).items()}


def controlnet_key(key: str, *, layers_per_block: int, hint_blocks: int) -> str:
    """The original-layout name (without `control_model.`) of one diffusers ControlNetModel key.

    lllyasviel's ControlNet is the UNet's encoder (same names) plus `input_hint_block` (a Sequential of convs with
    SiLUs between, so at even indices), `zero_convs.N.0` (diffusers' controlnet_down_blocks) and `middle_block_out.0`.
    """
    if m := re.match(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(.*)", key):
        index = 0 if m[1] == "conv_in" else 2 * (hint_blocks + 1) if m[1] == "conv_out" else 2 * (int(m[2]) + 1)
        return f"input_hint_block.{index}.{m[3]}"
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if key.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + key.removeprefix("controlnet_mid_block.")
    return _unet_key(key, per=layers_per_block + 1, up_attentions=[])


def controlnet_to_ldm(state: Tensors, *, layers_per_block: int) -> Tensors:
    """A diffusers ControlNetModel state dict in lllyasviel's original `control_model.*` names."""
    hint_blocks = len({k.split(".")[2] for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    return {"control_model." + controlnet_key(k, layers_per_block=layers_per_block, hint_blocks=hint_blocks): v
            for k, v in state.items()}


def _block(prefix: str, kind: str, rest: str, *, slot: str | None = None) -> str:
    """LDM name of a resnet (slot .0) or attention (slot .1) inside a numbered UNet block."""
    if kind == "attentions":
        return f"{prefix}.{'1' if slot is None else slot}.{rest}".replace("..", ".")
    part, _, tail = rest.partition(".")
    return f"{prefix}{'.0' if slot is None else slot}.{RESNET[part]}.{tail}"


def vae_to_ldm(state: Tensors, *, num_blocks: int) -> Tensors:
    """A diffusers AutoencoderKL state dict in LDM `first_stage_model.*` names (attention as 1x1 convs)."""

    def rename(key: str) -> str:
        coder, _, rest = key.partition(".")
        if coder in ("quant_conv", "post_quant_conv"):
            return key
        for old, new in VAE_TOP.items():
            if rest.startswith(old + "."):
                return f"{coder}.{new}{rest[len(old):]}"
        if m := re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)", rest):
            level = int(m[2]) if m[1] == "down" else num_blocks - 1 - int(m[2])
            return f"{coder}.{m[1]}.{level}.block.{m[3]}.{VAE_RESNET.get(m[4], m[4])}.{m[5]}"
        if m := re.match(r"(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(.*)", rest):
            level = int(m[2]) if m[1] == "down" else num_blocks - 1 - int(m[2])
            return f"{coder}.{m[1]}.{level}.{m[1]}sample.conv.{m[4]}"
        if m := re.match(r"mid_block\.resnets\.(\d+)\.(\w+)\.(.*)", rest):
            return f"{coder}.mid.block_{int(m[1]) + 1}.{VAE_RESNET.get(m[2], m[2])}.{m[3]}"
        if m := re.match(r"mid_block\.attentions\.0\.(.*)\.(weight|bias)", rest):
            return f"{coder}.mid.attn_1.{VAE_ATTENTION[m[1]]}.{m[2]}"
        if rest.startswith(("conv_in.", "conv_out.")):
            return key
        raise KeyError(f"no LDM name for VAE key {key!r}")

    out = {}
    for key, value in state.items():
        new = rename(key)
        if ".attn_1." in new and new.endswith(".weight") and ".norm." not in new and value.ndim == 2:
            value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: Tensors, *, prefix: str) -> Tensors:
    """A transformers CLIPTextModel state dict under an LDM prefix, in HF names with `text_model.` as SD1 files have."""
    return {prefix + (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in state.items() if not k.endswith("position_ids")}


def open_clip_to_ldm(state: Tensors, *, prefix: str) -> Tensors:
    """A transformers CLIPTextModel(WithProjection) state dict in OpenCLIP names (SD2, SDXL's second encoder)."""
    out: Tensors = {}
    simple = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    layer = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    state = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in state.items()}
    for key, value in state.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = value
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            out[f"transformer.resblocks.{m[1]}.{layer[m[2]]}.{m[3]}"] = value
        elif not key.endswith("position_ids"):
            raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
    for (i, kind), parts in qkv.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {prefix + k: v for k, v in out.items()}


def pipeline_to_ldm(pipe, *, family: str) -> Tensors:
    """Every component of a diffusers SD1/SD2/SDXL-style pipeline in one original-layout state dict."""
    unet = pipe.unet.config
    state = unet_to_ldm(pipe.unet.state_dict(), layers_per_block=unet.layers_per_block,
                        up_attentions=[t.startswith("CrossAttn") for t in unet.up_block_types])
    state |= vae_to_ldm(pipe.vae.state_dict(), num_blocks=len(pipe.vae.config.block_out_channels))
    text = pipe.text_encoder.state_dict()
    if family == "sdxl":
        state |= clip_to_ldm(text, prefix="conditioner.embedders.0.transformer.")
        state |= open_clip_to_ldm(pipe.text_encoder_2.state_dict(), prefix="conditioner.embedders.1.model.")
    elif family == "sd2":
        state |= open_clip_to_ldm(text, prefix="cond_stage_model.model.")
    else:
        state |= clip_to_ldm(text, prefix="cond_stage_model.transformer.")
    return {k: v.contiguous() for k, v in state.items()}


def save_single_file(pipe, path, *, family: str, metadata: dict[str, str] | None = None,
                     dtype: torch.dtype | None = None) -> None:
    """Write a pipeline as one original-layout .safetensors checkpoint (optionally cast, e.g. fp16 as civitai files)."""
    from safetensors.torch import save_file

    state = pipeline_to_ldm(pipe, family=family)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(path), metadata=metadata or {})
