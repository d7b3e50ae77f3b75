"""sdkit's CPU/GPU fast path: the precision, memory layout and attention each model part runs with, in one place."""

from __future__ import annotations

import torch

from sdkit import fusion, packing
from sdkit.device import Choice

CONV_PARTS = ("unet", "vae")  # convolution-heavy parts, which oneDNN runs faster in channels-last


def _channels_last(part: str, choice: Choice) -> bool:
    """Whether `prepare` puts this part in channels-last memory."""
    return part in CONV_PARTS and choice.device == "cpu" and choice.layout == "channels_last"


def memory_format(*, part: str, choice: Choice) -> torch.memory_format:
    """The layout 4-D (convolution) weights of this part are best created in, so `prepare` need not copy them."""
    return torch.channels_last if _channels_last(part, choice) else torch.contiguous_format


def prepare(model: torch.nn.Module, *, part: str, choice: Choice) -> torch.nn.Module:
    """Cast `model` to the chosen device and dtype, put conv nets in channels-last, freeze it for inference."""
    first = next(model.parameters(), None)
    if first is not None and (first.dtype != choice.torch_dtype or first.device.type != choice.device):
        from diffusers.utils import logging

        level = logging.get_verbosity()
        logging.set_verbosity_error()  # its note on casting is about its own loaders: the cast here is deliberate
        try:
            model = model.to(device=choice.device, dtype=choice.torch_dtype)
        finally:
            logging.set_verbosity(level)
    if part in CONV_PARTS:
        model = model.to(memory_format=memory_format(part=part, choice=choice))
    model = model.eval().requires_grad_(False)
    if part == "unet" and packing.wanted(model, device=choice.device)[0]:  # UNets and ControlNets: deep convolutions
        packing.pack(model)
    if part == "unet" and fusion.wanted(device=choice.device):
        fusion.fuse(model)
    return model


def describe(*, part: str, choice: Choice) -> str:
    """One line saying what `prepare` does to this part and why."""
    layout = ", channels-last (oneDNN's fast layout for convolutions)" if _channels_last(part, choice) else ""
    if part == "unet" and choice.device == "cpu" and packing.available():
        layout += ", convolution weights packed once (where memory allows)"
    if part == "unet" and fusion.wanted(device=choice.device):
        layout += ", biases, residual adds and GEGLU fused into oneDNN calls"
    return f"{choice.device} {choice.dtype}{layout}, PyTorch scaled-dot-product attention: {choice.reason}"
