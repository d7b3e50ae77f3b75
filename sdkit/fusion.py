"""Fused stand-ins for three diffusers UNet blocks on a CPU: the passes eager PyTorch runs that OpenVINO folds away.

`python -m sdkit bench --peers` split a CFG step by operator kind: sdkit's "other" (norms, activations, adds,
copies) took 0.44 s where OpenVINO's took 0.32 s, and the profile by shape showed where:
- GEGLU (the feed-forward's first layer): PyTorch adds a linear layer's bias by copying it into every row of the
  output before the matrix product (a [8192, 2560] copy, 0.03 s, at SD1.5's first level), then runs gelu and a
  multiply as two more passes. Here it is two oneDNN matrix products, the gate's with gelu fused into its output
  and the other's with the multiply by the gate fused into its output.
- ResnetBlock2D: the time embedding is added to conv1's output, the shortcut to conv2's, and the sum is divided by
  an output_scale_factor of 1.0: three passes over the feature map. Here the embedding (the same for every image
  of a batch) joins conv1's bias and the shortcut is added inside conv2 (`packing.convolve`); no division by 1.
- Transformer2DModel: the attention's channels-last output is copied to NCHW (`.contiguous()`), which SD1.5's 1x1
  convolution copies back to channels-last, then the residual is added. Here proj_out (convolution or linear) reads
  channels-last views and adds the residual inside its own call.

Each stand-in does what diffusers' forward does, in the same order; where its fused path cannot run (another
block configuration, a trace, gradients, a GPU, see `packing.eager`) it calls diffusers' own forward. Results
differ from the unfused path by bf16 rounding only (the bias and adds are applied before the one rounding of the
output rather than after it). Written by hand because no kept library fuses eager modules: `torch.compile` does
(and more) but compiled the SD1.5 UNet in 79 s here, needs a C++ compiler on the learner's machine, and freezes
LoRA weights out of reach. SDKIT_FUSE=0 turns it off.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable

import torch

from sdkit import packing


def wanted(*, device: str) -> bool:
    """Whether `prepare` fuses: on a CPU whose PyTorch has oneDNN's fused operators, unless SDKIT_FUSE=0."""
    return device == "cpu" and packing.available() and os.environ.get("SDKIT_FUSE") != "0"


def describe() -> str:
    """One line for `python -m sdkit device`."""
    if os.environ.get("SDKIT_FUSE") == "0":
        return "UNet biases, adds and activations run as separate passes (SDKIT_FUSE=0)"
    if not packing.available():
        return "UNet biases, adds and activations run as separate passes (this PyTorch has no oneDNN)"
    return ("UNet biases, residual adds, GEGLU's gelu and multiply fused into the convolutions and matrix products "
            "(oneDNN post-ops); SDKIT_FUSE=0 turns it off")


def fuse(model: torch.nn.Module) -> int:
    """Put the fused stand-ins on the model's GEGLU, ResnetBlock2D and Transformer2DModel blocks; how many."""
    found = 0
    for module in model.modules():
        attribute, stand_in = _stand_ins().get(type(module), (None, None))
        if attribute:
            setattr(module, attribute, types.MethodType(stand_in, module))  # a bound method: deepcopy rebinds it
            found += 1
    return found


def unfuse(model: torch.nn.Module) -> None:
    """Diffusers' own forwards back."""
    for module in model.modules():
        attribute = _fused(module)
        if attribute:
            del module.__dict__[attribute]


def is_fused(model: torch.nn.Module) -> bool:
    """Whether `fuse` was applied to this model."""
    return any(_fused(module) for module in model.modules())


def _fused(module: torch.nn.Module) -> str | None:
    """The attribute a stand-in of `fuse` replaces on this module, if it does."""
    attribute, stand_in = _stand_ins().get(type(module), (None, None))
    return attribute if attribute and getattr(module.__dict__.get(attribute), "__func__", None) is stand_in else None


def _diffusers_own() -> bool:
    """Whether diffusers' own forward runs: under gradients (training), a trace or `torch.compile`, which keep the
    graph diffusers wrote."""
    return torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling()


def _geglu(block, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """GEGLU as two matrix products: gelu(x Wg + bg) with gelu fused, then (x Wh + bh) * gate with the multiply
    fused. The halves are row slices of the one weight, so a LoRA merged into it reaches both."""
    proj = block.proj
    if args or kwargs or type(proj) is not torch.nn.Linear or not packing.eager(hidden_states, proj.weight):
        return type(block).forward(block, hidden_states, *args, **kwargs)
    half = proj.out_features // 2
    weight, bias = proj.weight, proj.bias
    value_bias, gate_bias = (None, None) if bias is None else (bias[:half], bias[half:])
    gate = torch.ops.mkldnn._linear_pointwise(hidden_states, weight[half:], gate_bias, "gelu", [], "none")  # erf
    return torch.ops.mkldnn._linear_pointwise.binary(hidden_states, gate, weight[:half], value_bias, "mul")


def _resnet(block, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
    """ResnetBlock2D with the time embedding in conv1's bias and the shortcut added inside conv2."""
    if (args or kwargs or block.upsample is not None or block.downsample is not None or temb is None
            or block.time_emb_proj is None or block.time_embedding_norm != "default"
            or block.output_scale_factor != 1.0 or _diffusers_own()):
        return type(block).forward(block, input_tensor, temb, *args, **kwargs)
    hidden = block.nonlinearity(block.norm1(input_tensor))
    if not block.skip_time_act:
        temb = block.nonlinearity(temb)
    temb = block.time_emb_proj(temb)
    if temb.shape[0] == 1 or bool((temb == temb[:1]).all()):  # one timestep for the batch: a bias
        hidden = packing.convolve(block.conv1, hidden, extra_bias=temb[0])
    else:
        hidden = packing.convolve(block.conv1, hidden) + temb[:, :, None, None]
    hidden = block.dropout(block.nonlinearity(block.norm2(hidden)))
    shortcut = input_tensor if block.conv_shortcut is None else block.conv_shortcut(input_tensor)
    return packing.convolve(block.conv2, hidden, add=shortcut)


def _transformer_output(block, hidden_states: torch.Tensor, residual: torch.Tensor, batch_size: int, height: int,
                        width: int, inner_dim: int) -> torch.Tensor:
    """Transformer2DModel's output: proj_out with the residual added inside it, on channels-last views of the tokens
    (1x1 convolution, SD1.5) or of the residual (linear, SD2 and SDXL), so nothing is copied to NCHW and back."""
    if _diffusers_own() or not residual.is_contiguous(memory_format=torch.channels_last):
        return type(block)._get_output_for_continuous_inputs(block, hidden_states, residual, batch_size, height,
                                                             width, inner_dim)
    if not block.use_linear_projection:
        tokens = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)  # a view, no copy
        return packing.convolve(block.proj_out, tokens, add=residual)
    proj = block.proj_out
    rows = residual.permute(0, 2, 3, 1).reshape(batch_size, height * width, -1)  # a view of channels-last, no copy
    if type(proj) is not torch.nn.Linear or not packing.eager(hidden_states, proj.weight):
        out = proj(hidden_states) + rows
    else:
        out = torch.ops.mkldnn._linear_pointwise.binary(hidden_states, rows, proj.weight, proj.bias, "add")
    return out.reshape(batch_size, height, width, -1).permute(0, 3, 1, 2)  # channels-last, as the residual


@functools.cache  # asked once per module by fuse, unfuse and is_fused
def _stand_ins() -> dict[type, tuple[str, Callable]]:
    """diffusers block class -> (the attribute its stand-in replaces, the stand-in); exact classes, not subclasses,
    whose forwards may differ."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return {GEGLU: ("forward", _geglu), ResnetBlock2D: ("forward", _resnet),
            Transformer2DModel: ("_get_output_for_continuous_inputs", _transformer_output)}
