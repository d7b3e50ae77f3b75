"""The UNet run by OpenVINO, on CPUs where `python -m sdkit device --measure` timed it faster than PyTorch.

OpenVINO (Intel's inference engine, the one FastSD CPU runs on) compiles the UNet's graph with its own fused CPU
kernels. sdkit converts the pipeline's UNet in memory on the first picture that uses it (`openvino.convert_model`;
about a minute for SD1.5, the note under the picture says how long) and compiles it for the picture's size. The
pictures it does not make run in PyTorch, the reference path (`generate` says which, in a note): with LoRAs (sdkit
merges their weights into the UNet's, so each weight would need a new conversion), ControlNet's residuals, SDXL's
extra conditioning, and fast mode's DeepCache and token merging, which change the UNet's own forward. Nothing is
written to disk.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
import warnings
from typing import TYPE_CHECKING

from sdkit.errors import SdkitError
from sdkit.standins import StandIns

if TYPE_CHECKING:
    import torch

PRECISION = {"bfloat16": "bf16", "float32": "f32"}  # OpenVINO's inference precision for each dtype sdkit picks
KEPT = 2  # compiled sizes kept at once (Engine._compile)
PLAIN = {"timestep_cond", "cross_attention_kwargs", "added_cond_kwargs", "down_block_additional_residuals",
         "mid_block_additional_residual", "down_intrablock_additional_residuals", "encoder_attention_mask",
         "attention_mask", "class_labels"}  # UNet arguments that, when given, send the call to PyTorch


def installed() -> bool:
    """Whether the openvino package is importable here."""
    return importlib.util.find_spec("openvino") is not None


def no_telemetry() -> None:
    """openvino's converter reports usage to Google Analytics unless told not to; without its telemetry package it
    uses a no-op stub. sdkit makes no network calls the user did not ask for."""
    sys.modules["openvino_telemetry"] = None


def convert(unet: torch.nn.Module):
    """The UNet as an openvino.Model of (sample, timestep, context) -> noise, traced in fp32 (OpenVINO lowers the
    precision itself when it compiles; a bf16 graph gave NaN), its sizes left open (`Engine` fixes them)."""
    import torch

    no_telemetry()
    import openvino as ov

    class Call(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, sample, timestep, context):
            return self.model(sample, timestep, context, return_dict=False)[0]

    source = unet if unet.dtype == torch.float32 else _fp32_copy(unet)
    context = torch.randn(2, 77, source.config.cross_attention_dim)
    # Traced at a side the UNet cannot halve evenly all the way down, so diffusers hands each upsampler its skip's
    # size (at even multiples it traces a plain doubling, and a 600-pixel side would then not fit its skip).
    side = 2 * 2 ** source.num_upsamplers + 1
    example = (torch.randn(2, source.config.in_channels, side, side), torch.tensor([500.0]), context)
    with torch.no_grad(), _without_standins(source), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python branches over shapes: sizes are fixed later
        model = ov.convert_model(Call(source).eval(), example_input=example)
    if unet.dtype != torch.float32:  # weights kept in fp16, as OpenVINO's converter (ovc) saves them: SD1.5's UNet
        try:  # holds 4.65 GiB instead of 6.25 once converted; the conversion's peak is 7.9 GiB instead of 6.4
            from openvino._offline_transformations import compress_model_transformation
        except ImportError:  # ovc's own module, not a promised API: without it the weights stay fp32
            return model
        compress_model_transformation(model)
    return model


def _fp32_copy(unet: torch.nn.Module) -> torch.nn.Module:
    """An fp32 copy of a bf16/fp16 UNet to trace (freed once traced)."""
    import copy

    import torch
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # its note on casting with `to()` is about its own loaders: this copy is deliberate
    try:
        return copy.deepcopy(unet).to(dtype=torch.float32, memory_format=torch.contiguous_format)
    finally:
        logging.set_verbosity(level)


@contextlib.contextmanager
def _without_standins(unet):
    """Trace the UNet's own forward even while a stand-in (this module's) is in place."""
    saved = unet.__dict__.pop("forward", None)
    try:
        yield
    finally:
        if saved is not None:
            unet.forward = saved


class Engine:
    """One UNet converted to OpenVINO, compiled for the last KEPT input sizes it was called with."""

    def __init__(self, unet: torch.nn.Module, *, dtype: str, threads: int | None = None, model=None,
                 profile: bool = False) -> None:
        import torch

        no_telemetry()
        import openvino as ov

        started = time.perf_counter()
        self.model = model if model is not None else convert(unet)  # `model`: an earlier conversion of this UNet
        self.convert_seconds = time.perf_counter() - started
        self.config = {"INFERENCE_PRECISION_HINT": PRECISION.get(dtype, "f32"), "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "PERF_COUNT": profile}
        self.core, self.ov = ov.Core(), ov
        self.compiled: dict[tuple, object] = {}  # by (sample shape, context shape), the last used last

    def _compile(self, shape: tuple):
        """Compiled for static shapes (sample, context), OpenVINO's fastest kernels (1.1-1.4x faster than dynamic
        shapes on an SD1.5 level at 512² here). KEPT sizes are kept: a CFG step and a step without CFG (fast mode)
        alternate two batch sizes; each compiled model holds its own packed copy of the weights."""
        if shape in self.compiled:
            self.compiled[shape] = self.compiled.pop(shape)  # now the last used
            return self.compiled[shape]
        while len(self.compiled) >= KEPT:
            self.compiled.pop(next(iter(self.compiled)))  # the least recently used goes before a new one is packed
        sample, context = shape
        self.model.reshape({0: self.ov.PartialShape(list(sample)), 1: self.ov.PartialShape([1]),
                            2: self.ov.PartialShape(list(context))})
        self.compiled[shape] = self.core.compile_model(self.model, "CPU", self.config)
        return self.compiled[shape]

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The predicted noise, in the caller's dtype."""
        import torch

        compiled = self._compile((tuple(sample.shape), tuple(context.shape)))
        inputs = [sample.float().contiguous().numpy(), timestep.float().reshape(1).numpy(),
                  context.float().contiguous().numpy()]
        out = compiled(inputs)[0]
        return torch.from_numpy(out.copy()).to(dtype=sample.dtype)

    def kinds(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> dict[str, float]:
        """Seconds of one call by operator kind (made with profile=True), see `kinds`."""
        compiled = self._compile((tuple(sample.shape), tuple(context.shape)))
        return kinds(compiled, [sample.float().contiguous().numpy(), timestep.float().reshape(1).numpy(),
                                context.float().contiguous().numpy()])


def kinds(compiled, inputs: list) -> dict[str, float]:
    """Seconds of one call of a model compiled with PERF_COUNT, by the operator kinds `sdkit.bench` profiles PyTorch's
    UNet in: convolution, matmul (OpenVINO's FullyConnected), attention (the nodes its fused attention came from:
    softmax, scaled dot-product) and other; "between" is the rest of the call's wall time. The second of two calls,
    the first having allocated."""
    from sdkit.bench import KINDS

    request = compiled.create_infer_request()
    request.infer(inputs)
    start = time.perf_counter()
    request.infer(inputs)
    wall = time.perf_counter() - start
    fused = {op.get_friendly_name(): op.get_rt_info()["originalLayersNames"].astype(str)
             for op in compiled.get_runtime_model().get_ordered_ops() if "originalLayersNames" in op.get_rt_info()}
    spent = dict.fromkeys((*KINDS, "other"), 0.0)
    for node in request.get_profiling_info():
        spent[_kind(node.node_type, fused.get(node.node_name, ""))] += node.real_time.total_seconds()
    return spent | {"between": max(0.0, wall - sum(spent.values()))}


def _kind(node_type: str, fused: str) -> str:
    """The kind of one compiled OpenVINO node, from its type and the names of the graph nodes fused into it."""
    if "scaled_dot_product" in fused or "Softmax" in fused:
        return "attention"
    if node_type in ("Convolution", "Deconvolution", "GroupConvolution"):
        return "convolution"
    return "matmul" if node_type in ("FullyConnected", "MatMul") else "other"


def _step_time(timestep, batch: int):
    """The call's one timestep as a 1-element float tensor, or None where the batch has several (PyTorch runs it)."""
    import torch

    t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
    if t.numel() != 1 and not (t.numel() == batch and bool((t == t[0]).all())):
        return None
    return t[:1]


def takes(kwargs: dict) -> bool:
    """Whether a UNet call with these keyword arguments is one the converted UNet runs (plain text-to-noise)."""
    return all(kwargs.get(name) is None or kwargs.get(name) == {} for name in PLAIN)


def _key(pipe) -> dict:
    """What a kept conversion was made from: the UNet object, its LoRAs and its precision (OpenVINO's, too)."""
    from sdkit import loras

    return {"the UNet": id(pipe.unet), "the LoRAs": tuple(loras.active(pipe)),
            "the precision": str(pipe.unet.dtype).removeprefix("torch.")}


def converted(pipe) -> bool:
    """Whether the pipeline holds a conversion for its UNet as it is now (the next picture converts nothing)."""
    kept = pipe.__dict__.get("_sdkit_openvino")
    return kept is not None and kept[0] == _key(pipe)


def memory_needed_gib(unet: torch.nn.Module) -> float:
    """Memory a conversion takes on top of the loaded pipeline, in GiB: twice the UNet in fp32 (the fp32 trace and
    its graph, then the compiled weights; SD1.5's took 5.1 GiB at its peak, 3.7 GiB held after)."""
    return 2 * 4 * sum(p.numel() for p in unet.parameters()) / 2**30


def engine(pipe) -> tuple[Engine, str | None]:
    """The pipeline's OpenVINO UNet for its current UNet, LoRAs and precision, converting it when there is none yet;
    and a note saying how long a conversion took (None when the kept one was used)."""
    key = _key(pipe)
    kept = pipe.__dict__.get("_sdkit_openvino")
    if kept is not None and kept[0] == key:
        return kept[1], None
    pipe.__dict__.pop("_sdkit_openvino", None)  # the old conversion's memory goes before the new one is made
    try:
        made = Engine(pipe.unet, dtype=key["the precision"])
    except Exception as error:  # noqa: BLE001 - OpenVINO's own errors (and MemoryError) become one line with a fix
        raise _failed("convert the UNet", error) from error
    pipe.__dict__["_sdkit_openvino"] = (key, made)
    changed = [name for name in key if kept is not None and kept[0].get(name) != key[name]]
    why = "for this model" if kept is None else f"again: {' and '.join(changed)} changed"
    return made, (f"The UNet was converted for OpenVINO {why} in {made.convert_seconds:.0f} s (once per model; "
                  f"`python -m sdkit device` says why OpenVINO runs it here).")


def _failed(doing: str, error: BaseException) -> SdkitError:
    """An SdkitError for OpenVINO failing at `doing`, with the way back to PyTorch."""
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return SdkitError(f"OpenVINO could not {doing}: {type(error).__name__}: {first}",
                      fix="run the UNet in PyTorch: set SDKIT_BACKEND=pytorch (or `python -m sdkit device --measure`)")


@contextlib.contextmanager
def running(pipe, *, on: bool, notes: list[str] | None = None):
    """While inside, the pipeline's UNet calls run in OpenVINO when `on` (and the call is a plain one, see `takes`);
    a conversion's note is added to `notes`."""
    if not on:
        yield None
        return
    made, note = engine(pipe)
    if note and notes is not None:
        notes.append(note)
    calls = {"openvino": 0, "pytorch": 0}

    def make(original):
        def forward(sample, timestep, encoder_hidden_states=None, *args, return_dict: bool = True, **kwargs):
            t = _step_time(timestep, sample.shape[0])
            if args or encoder_hidden_states is None or t is None or not takes(kwargs):
                calls["pytorch"] += 1
                return original(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
            calls["openvino"] += 1
            try:
                noise = made(sample, t, encoder_hidden_states)
            except Exception as error:  # noqa: BLE001 - a failed compile or run: one line with a fix
                raise _failed(f"run the UNet at {tuple(sample.shape)}", error) from error
            if return_dict:
                from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

                return UNet2DConditionOutput(sample=noise)
            return (noise,)

        return forward

    standins = StandIns()
    standins.replace(pipe.unet, make)
    try:
        yield calls
    finally:
        standins.restore()
