"""Tiny random SD1 / SD2 / SDXL pipelines in real key layouts: fixtures for tests and for notebooks before real weights."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers.utils import logging as transformers_logging

transformers_logging.set_verbosity_error()  # diffusers' pipeline imports warn about image processors never used here
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402

transformers_logging.set_verbosity_warning()

from sdkit.checkpoints import CONFIGS, _tokenizer
from sdkit.convert import save_single_file

VOCAB = 49408  # the shipped CLIP tokenizer's vocabulary


def text_config(hidden: int, layers: int, *, act: str, projection: int | None = None) -> CLIPTextConfig:
    """A tiny CLIP text config following the real families' rule of 64-channel heads."""
    return CLIPTextConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                          num_attention_heads=max(1, hidden // 64), vocab_size=VOCAB, max_position_embeddings=77,
                          hidden_act=act, projection_dim=projection or hidden, bos_token_id=0, eos_token_id=2,
                          pad_token_id=1)


def tiny_pipeline(family: str, *, seed: int = 0, vae_levels: int = 2):
    """A random tiny pipeline of `family` (sd1, sd2, sdxl) in fp32; vae_levels=4 gives the real 8x latent factor."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(32,) * vae_levels, layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * vae_levels,
                        up_block_types=("UpDecoderBlock2D",) * vae_levels)
    scheduler = EulerDiscreteScheduler.from_pretrained(CONFIGS / family, subfolder="scheduler")
    if family == "sdxl":
        te = CLIPTextModel(text_config(32, 2, act="quick_gelu"))
        te2 = CLIPTextModelWithProjection(text_config(64, 2, act="gelu", projection=64))
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=96, sample_size=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=[1, 1], use_linear_projection=True, transformer_layers_per_block=[1, 2],
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 64)
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=_tokenizer("clip_l"),
                                         tokenizer_2=_tokenizer("open_clip"), unet=unet, scheduler=scheduler)
    sd2 = family == "sd2"
    te = CLIPTextModel(text_config(64 if sd2 else 32, 2, act="gelu" if sd2 else "quick_gelu"))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64 if sd2 else 32, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=[1, 1] if sd2 else 8, use_linear_projection=sd2)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=_tokenizer("open_clip" if sd2 else "clip_l"),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_tiny(family: str, path: Path, *, seed: int = 0, vae_levels: int = 2):
    """Write a tiny random checkpoint of `family` to `path`; returns the in-memory pipeline."""
    pipe = tiny_pipeline(family, seed=seed, vae_levels=vae_levels)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_single_file(pipe, path, family=family)
    return pipe


# The names a ComfyUI all-in-one FLUX file uses for one tensor of each part (its real layout, not its real size).
FLUX_ALL_IN_ONE = ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
                   "model.diffusion_model.single_blocks.0.linear1.weight",
                   "vae.decoder.conv_in.weight",
                   "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight",
                   "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight")


def write_named(path: Path, names: tuple[str, ...] = FLUX_ALL_IN_ONE, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A safetensors file with one tiny tensor per name: a file's layout without its size (for recognition only)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: torch.zeros(4, 4, dtype=dtype) for name in names}, str(path))
    return path


def write_lora(pipe, path: Path, *, kind: str = "lora", naming: str = "kohya", rank: int = 2, alpha: float = 1.0,
               seed: int = 0, scale: float = 0.3, dora: bool = False, text_encoder: bool = True,
               metadata: dict[str, str] | None = None, every_linear: bool = False) -> dict[str, torch.Tensor]:
    """A random LoRA for `pipe`'s attention (and text-encoder) layers in a real file layout; returns its tensors.

    kind: lora | loha | lokr; naming: kohya (diffusers-style UNet names), sai (the original UNet names, as kohya
    writes SDXL files), peft (diffusers' own `unet.<module>.lora_A.weight`). every_linear: every linear layer of the
    UNet's transformer blocks and of the text encoder's layers, as kohya's default LoRA trains (for the bench).
    """
    from safetensors.torch import save_file

    from sdkit.loras import _ldm_unet_names

    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator) * scale  # noqa: E731
    ldm = _ldm_unet_names(pipe) if naming == "sai" else {}
    parts = [("unet", pipe.unet)] + ([("text_encoder", pipe.text_encoder)] if text_encoder else [])
    tensors: dict[str, torch.Tensor] = {}
    for component, model in parts:
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            wanted = ("attentions." in name or "layers." in name) if every_linear else name.endswith(
                ("to_q", "to_k", "to_v", "q_proj", "v_proj"))
            if not wanted:
                continue
            out_f, in_f = module.weight.shape
            if naming == "peft":
                full = name if component == "unet" or name.startswith("text_model.") else "text_model." + name
                layer = f"{component}.{full}"
            elif component == "unet":
                layer = "lora_unet_" + (ldm[name + ".weight"].removesuffix(".weight") if naming == "sai" else name).replace(".", "_")
            else:
                full = name if name.startswith("text_model.") else "text_model." + name
                layer = "lora_te_" + full.replace(".", "_")
            if kind == "lora" and naming == "peft":
                tensors[f"{layer}.lora_A.weight"], tensors[f"{layer}.lora_B.weight"] = rand(rank, in_f), rand(out_f, rank)
            elif kind == "lora":
                tensors[f"{layer}.lora_down.weight"], tensors[f"{layer}.lora_up.weight"] = rand(rank, in_f), rand(out_f, rank)
            elif kind == "loha":
                for i in (1, 2):
                    tensors[f"{layer}.hada_w{i}_a"], tensors[f"{layer}.hada_w{i}_b"] = rand(out_f, rank), rand(rank, in_f)
            else:  # lokr: w1 small and full, w2 low-rank, as LyCORIS's factorization writes them
                f_out, f_in = 2 if out_f % 2 == 0 else 1, 2 if in_f % 2 == 0 else 1
                tensors[f"{layer}.lokr_w1"] = rand(f_out, f_in)
                tensors[f"{layer}.lokr_w2_a"], tensors[f"{layer}.lokr_w2_b"] = rand(out_f // f_out, rank), rand(rank, in_f // f_in)
            if naming != "peft":
                tensors[f"{layer}.alpha"] = torch.tensor(float(alpha))
            if dora:
                tensors[f"{layer}.dora_scale"] = module.weight.detach().float().norm(dim=0, keepdim=True) * 1.1
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return tensors


# Real-ESRGAN's "new" RRDBNet names for the old ESRGAN ones (RealESRGAN_x4plus.pth uses them).
ESRGAN_NEW_NAMES = {"model.0.": "conv_first.", "model.3.": "conv_up1.", "model.6.": "conv_up2.", "model.8.": "conv_hr.",
                    "model.10.": "conv_last."}


def write_upscaler(kind: str, path: Path, *, scale: int = 4, seed: int = 0) -> Path:
    """A tiny random upscale model in a real file layout: 'compact' (Real-ESRGAN compact, `body.N`), 'esrgan'
    (ESRGAN's old `model.N` layout), 'esrgan-new' (Real-ESRGAN's RRDBNet names, wrapped in `params_ema`) or
    'swinir'. Saved as .safetensors or a .pth pickle by the path's suffix."""
    torch.manual_seed(seed)
    if kind == "compact":
        from spandrel.architectures.Compact import Compact

        state = Compact(num_feat=8, num_conv=2, upscale=scale).state_dict()
    elif kind in ("esrgan", "esrgan-new"):
        from spandrel.architectures.ESRGAN import ESRGAN

        state = ESRGAN(num_filters=8, num_blocks=1, scale=scale).state_dict()
        if kind == "esrgan-new":
            state = {_new_esrgan_name(k): v for k, v in state.items()}
    elif kind == "swinir":
        from spandrel.architectures.SwinIR import SwinIR

        state = SwinIR(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, mlp_ratio=2,
                       upscale=scale, upsampler="pixelshuffledirect").state_dict()
    else:
        raise ValueError(f"unknown upscaler kind {kind!r}")
    state = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"params_ema": state} if kind == "esrgan-new" else state, path)
    return path


def _new_esrgan_name(key: str) -> str:
    """An old ESRGAN key in Real-ESRGAN's RRDBNet naming."""
    import re

    if m := re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key):
        return f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"
    if m := re.match(r"model\.1\.sub\.\d+\.(weight|bias)", key):
        return f"conv_body.{m[1]}"
    for old, new in ESRGAN_NEW_NAMES.items():
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(key)


def write_controlnet(pipe, path: Path, *, layout: str = "original", seed: int = 0, metadata: dict | None = None):
    """A random ControlNet for `pipe`'s UNet written in `layout` (original, diffusers or difference); returns the
    diffusers ControlNetModel it was written from. Its zero convolutions are random too, so it changes images."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from sdkit.convert import controlnet_to_ldm, unet_to_ldm

    torch.manual_seed(seed)
    levels = len(pipe.vae.config.block_out_channels)  # one stride-2 hint convolution per VAE downsampling
    model = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=tuple(16 * 2**i for i in range(levels)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                parameter.normal_(0, 0.2)
    model = model.float().eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if layout != "diffusers":
        state = controlnet_to_ldm(state, layers_per_block=model.config.layers_per_block)
    if layout == "difference":
        unet = pipe.unet.config
        base = unet_to_ldm({k: v.float() for k, v in pipe.unet.state_dict().items()},
                           layers_per_block=unet.layers_per_block,
                           up_attentions=[t.startswith("CrossAttn") for t in unet.up_block_types])
        base = {k.replace("model.diffusion_model.", "control_model."): v for k, v in base.items()}
        state = {k: (v - base[k]).contiguous() if k in base else v for k, v in state.items()}
        state["difference"] = torch.tensor([])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata or {})
    return model


def write_depth_model(folder: Path, *, seed: int = 0) -> Path:
    """A tiny random DPT depth-estimation model (transformers' layout: config, weights, preprocessor) in `folder`."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64,
                       patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 8, 8],
                       fusion_hidden_size=8, reassemble_factors=[4, 2, 1, 0.5])
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False).save_pretrained(folder)
    return folder
