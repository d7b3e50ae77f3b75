"""Convolution weights packed once into oneDNN's blocked layout, instead of on every call.

PyTorch hands oneDNN each convolution's weight in plain order, and oneDNN reorders it into the blocked layout its
AMX / AVX-512 kernels read, on every call (ONEDNN_VERBOSE=1 shows a `reorder` before each `brg_conv_fwd`). For
SD1.5's deep convolutions (2560 -> 1280 channels at 8x8 or 16x16 latent positions) that reorder takes longer than
the convolution itself; OpenVINO packs once when it compiles. Here each UNet convolution keeps a packed copy beside
its plain weight, which LoRA merges, the OpenVINO conversion and `state_dict` still read and write. A weight changed
in place (a LoRA merged into it) is packed again on its next call. The cost is memory: a second copy of the
convolution weights (1.1 GiB for SD1.5 in bf16), so the UNet is packed only where that much is free besides HEADROOM.

Written by hand because no kept library does it for eager modules: PyTorch's inductor packs the same way
(`torch.ops.mkldnn._reorder_convolution_weight`, `_convolution_pointwise`) only inside `torch.compile` with
freezing, which compiled the SD1.5 UNet in 79 s here and froze LoRA weights out of reach.
"""

from __future__ import annotations

import os
import types
import weakref

import torch

HEADROOM_GIB = 2.0  # memory left free after the packed copies, for the picture's activations and the VAE decode
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # conv module -> (key, packed weight); outside the
# modules so `copy.deepcopy` (the OpenVINO conversion's fp32 copy) and `state_dict` never see an opaque oneDNN tensor


def available() -> bool:
    """Whether this PyTorch can run packed convolutions (oneDNN built in, the mkldnn ops present)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def convolutions(model: torch.nn.Module) -> list[torch.nn.Conv2d]:
    """The model's 2-D convolutions that a packed weight can run: zero padding given in numbers."""
    return [m for m in model.modules() if type(m) is torch.nn.Conv2d and m.padding_mode == "zeros"
            and not isinstance(m.padding, str)]


def packed_gib(model: torch.nn.Module) -> float:
    """GiB the packed copies of the model's convolution weights take."""
    return sum(m.weight.numel() * m.weight.element_size() for m in convolutions(model)) / 2**30


def wanted(model: torch.nn.Module, *, device: str) -> tuple[bool, str]:
    """(pack?, why): on a CPU with oneDNN where the copies fit beside HEADROOM_GIB free; SDKIT_PACK=0 turns it off."""
    import psutil

    if os.environ.get("SDKIT_PACK") == "0":
        return False, "SDKIT_PACK=0"
    if device != "cpu" or not available():
        return False, "oneDNN packs only on a CPU"
    size = packed_gib(model)
    free = psutil.virtual_memory().available / 2**30
    if free < size + HEADROOM_GIB:
        return False, f"the packed copies ({size:.1f} GiB) would leave under {HEADROOM_GIB:.0f} GiB of {free:.1f} free"
    return True, f"convolution weights packed once for oneDNN (+{size:.2f} GiB)"


def describe() -> str:
    """One line for `python -m sdkit device`: whether UNet convolutions run on packed weights here, and why."""
    if os.environ.get("SDKIT_PACK") == "0":
        return "UNet convolution weights reordered on every call (SDKIT_PACK=0)"
    if not available():
        return "UNet convolution weights reordered on every call (this PyTorch has no oneDNN)"
    return (f"UNet convolution weights packed once for oneDNN where the copy fits with {HEADROOM_GIB:.0f} GiB to spare "
            "(SD1.5 bf16: +1.1 GiB), not reordered on every call; SDKIT_PACK=0 turns it off")


def pack(model: torch.nn.Module) -> int:
    """Run each of the model's convolutions on a packed weight from its next call on; how many."""
    found = convolutions(model)
    for conv in found:
        conv.forward = types.MethodType(_forward, conv)  # a bound method: a deep copy rebinds it to the copy
    return len(found)


def unpack(model: torch.nn.Module, *, free: bool = True) -> None:
    """Back to PyTorch's own convolution forward; the packed copies are freed (or kept for a later `pack`)."""
    for conv in convolutions(model):
        if _runs_packed(conv):
            del conv.forward
        if free:
            _PACKED.pop(conv, None)


def is_packed(model: torch.nn.Module) -> bool:
    """Whether `pack` was applied to this model."""
    return any(_runs_packed(m) for m in convolutions(model))


def _runs_packed(conv: torch.nn.Conv2d) -> bool:
    """Whether this convolution's forward is `pack`'s."""
    return getattr(conv.__dict__.get("forward"), "__func__", None) is _forward


def eager(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a call on (x, weight) can run oneDNN's fused CPU operators, which have no backward and no trace: an
    eager CPU call in the weight's dtype, no gradient to the weight or through it to the input, not under a trace or
    `torch.compile`, and a weight not made under inference_mode (which has no version counter to notice changes)."""
    return not (x.device.type != "cpu" or x.dtype != weight.dtype or torch.jit.is_tracing()
                or torch.compiler.is_compiling() or weight.is_inference()
                or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)))


def convolve(conv: torch.nn.Conv2d, x: torch.Tensor, *, extra_bias: torch.Tensor | None = None,
             add: torch.Tensor | None = None) -> torch.Tensor:
    """conv(x) + extra_bias (one value per output channel) + add, as one oneDNN call on the packed weight where it
    can run (the bias and the add fused into the convolution's output), else as PyTorch's convolution and adds."""
    weight = _packed_weight(conv, x)
    if weight is None or (add is not None and not _same_layout(x, add)):
        y = conv(x) if weight is None else _run(conv, x, weight, conv.bias)
        y = y if extra_bias is None else y + extra_bias[:, None, None]
        return y if add is None else y + add
    bias = conv.bias if extra_bias is None else extra_bias if conv.bias is None else conv.bias + extra_bias
    if add is None:
        return _run(conv, x, weight, bias)
    return torch.ops.mkldnn._convolution_pointwise.binary(x, add, weight, bias, *_args(conv), "add", None, None, [],
                                                          None)


def _same_layout(x: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether both are channels-last (the layout a fused add reads `other` in), or both plain NCHW."""
    return all(t.is_contiguous(memory_format=torch.channels_last) for t in (x, other)) or \
        all(t.is_contiguous() for t in (x, other))


def _args(conv: torch.nn.Conv2d) -> tuple:
    """The convolution's padding, stride, dilation and groups, as the mkldnn operators take them."""
    return list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups


def _run(conv: torch.nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The convolution on a packed weight."""
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *_args(conv), "none", [], "")


def _packed_weight(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor | None:
    """The packed copy of the convolution's weight for this call, packed now if the weight changed; None where the
    plain convolution must run (not packed, or not an eager CPU inference call)."""
    weight = conv.weight
    if not _runs_packed(conv) or not eager(x, weight):
        return None
    key = (weight._version, weight.data_ptr(), weight.dtype)
    held = _PACKED.get(conv)
    if held is None or held[0] != key:  # new weights (a LoRA merged, a cast): pack again
        _PACKED.pop(conv, None)  # the old copy goes before the new one is made
        # packed for this call's sizes; other sizes give the same numbers (oneDNN adapts it), checked in the tests
        held = _PACKED[conv] = (key, torch.ops.mkldnn._reorder_convolution_weight(weight, *_args(conv), list(x.shape)))
    return held[1]


def _forward(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The convolution on its packed weight; the plain one where packing cannot apply (see `eager`)."""
    weight = _packed_weight(conv, x)
    return torch.nn.Conv2d.forward(conv, x) if weight is None else _run(conv, x, weight, conv.bias)
