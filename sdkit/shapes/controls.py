"""Train shapes-v1's ControlNet on this CPU: python -m sdkit.shapes.controls {train,bundle,card,all}.

`shapes-v1-layout`: a ControlNet in lllyasviel's original single-file layout (`control_model.*`) that makes shapes-v1
put its shape where a control image says. The control image is white on black, as real ControlNets take it: the
canny edges of a shape, or its filled silhouette (a scribbled blob). It says nothing about colour, so the colour
comes from the prompt. Built by diffusers' `ControlNetModel.from_unet` (its encoder half starts as a copy of the
frozen UNet's, its zero convolutions at 0) and trained with the base model's loss, seeded and resumable, logging
to runs/shapes/controlnet.log like every other shapes-world part.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdkit.shapes import data
from sdkit.shapes.addons import MODELS, _atomic_save, base_parts
from sdkit.shapes.train import OFFSET_NOISE, RUNS, Plan, command_line, fit, frozen_context

NAME = "shapes-v1-layout"
LOG_NAME = "controlnet"
KINDS = ("edges", "blob")  # what a control image shows: a shape's canny edges, or its filled silhouette
HINT_CHANNELS = (16, 32, 64)  # two stride-2 convolutions: 64 px control images -> shapes-v1's 16x16 latents
PLAN = Plan(steps=2000, batch=32, lr=1e-3, save_every=100, warmup=50)


def control_image(spec: data.ShapeSpec, *, kind: str, size: int = 64) -> Image.Image:
    """The control image of a spec: white canny edges or a white silhouette on black, RGB, size x size."""
    from sdkit import preprocess

    if kind == "edges":
        return preprocess.canny(data.draw(spec, size=size))
    if kind == "blob":
        return Image.fromarray(np.where(data.mask(spec, size=size) >= 128, 255, 0).astype(np.uint8)).convert("RGB")
    raise ValueError(f"unknown control kind {kind!r}; use one of {KINDS}")


def batch(step: int, plan: Plan) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Seeded pictures in [-1, 1], their control images in [0, 1] (half edges, half blobs), and captions."""
    rng = np.random.default_rng(plan.seed * 1_000_003 + step)
    pictures, controls, captions = [], [], []
    for _ in range(plan.batch):
        spec = data.random_spec(rng)
        pictures.append(np.asarray(data.draw(spec)))
        controls.append(np.asarray(control_image(spec, kind=KINDS[int(rng.integers(len(KINDS)))])))
        captions.append(data.caption(spec, rng=rng))
    to_tensor = lambda arrays: torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()  # noqa: E731
    return to_tensor(pictures) / 127.5 - 1, to_tensor(controls) / 255, captions


class ControlTask(torch.nn.Module):
    """A ControlNet made from shapes-v1's UNet; the UNet, VAE and text encoder stay frozen."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers import ControlNetModel

        self.unet, self.vae, self.text, self.tokenizer, self.noise = base_parts()
        torch.manual_seed(0)
        self.controlnet = ControlNetModel.from_unet(self.unet, conditioning_embedding_out_channels=HINT_CHANNELS)
        self.controlnet.train().requires_grad_(True)
        self._context: dict[str, torch.Tensor] = {}

    def loss(self, step: int, plan: Plan) -> torch.Tensor:
        """The base model's epsilon loss with the ControlNet's residuals added (10% of captions dropped for CFG)."""
        pixels, controls, captions = batch(step, plan)
        generator = torch.Generator().manual_seed(plan.seed * 1_000_003 + step)
        drop = (torch.rand(len(captions), generator=generator) < 0.1).tolist()
        context = frozen_context(self._context, self.tokenizer, self.text,
                                 ["" if d else c for c, d in zip(captions, drop)])
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        noise = noise + OFFSET_NOISE * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (len(pixels),), generator=generator)
        noisy = self.noise.add_noise(latents, noise, t)
        down, mid = self.controlnet(noisy, t, context, controlnet_cond=controls, return_dict=False)
        predicted = self.unet(noisy, t, context, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample
        return F.mse_loss(predicted, noise)


def train(*, runs: Path = RUNS, steps: int | None = None) -> float:
    """Train (or resume) the ControlNet; returns the training seconds."""
    plan = Plan(**{**asdict(PLAN), "steps": steps or PLAN.steps})
    task = ControlTask()
    seconds = fit(task, plan, name=LOG_NAME, runs=runs)
    torch.save(task.controlnet.state_dict(), runs / f"{LOG_NAME}.weights.pt")
    return seconds


def bundle(*, runs: Path = RUNS, models: Path = MODELS) -> Path:
    """models/controlnet/shapes-v1-layout.safetensors: the trained ControlNet in the original layout, fp16."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from sdkit import convert, formats
    from sdkit.shapes.train import BUNDLE

    unet = base_parts()[0]
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS)
    controlnet.load_state_dict(torch.load(runs / f"{LOG_NAME}.weights.pt", weights_only=True))
    state = {k: v.half().contiguous() for k, v in convert.controlnet_to_ldm(
        controlnet.state_dict(), layers_per_block=controlnet.config.layers_per_block).items()}
    metadata = {"modelspec.architecture": "sdkit-shapes-v1/controlnet", "modelspec.title": NAME,
                "sdkit.base_model": BUNDLE.name, "sdkit.base_model_sha256": formats.sha256(BUNDLE),
                "sdkit.control": "white edges or silhouette of the shape on black"}
    return _atomic_save(state, models / "controlnet" / f"{NAME}.safetensors", metadata, save_file)


def main(argv: list[str] | None = None) -> None:
    """Command line: train, bundle, write the card, or all three."""
    args = command_line("sdkit.shapes.controls", ["train", "bundle", "card", "all"], argv, models=MODELS)
    if args.part in ("train", "all"):
        train(runs=args.runs, steps=args.steps)
    if args.part in ("bundle", "all"):
        print(bundle(runs=args.runs, models=args.models))
    if args.part in ("card", "all"):
        from sdkit.shapes.placement import model_card

        print(model_card(runs=args.runs, models=args.models))


if __name__ == "__main__":
    main()


class LayoutEditor:
    """An ipywidgets layout editor for the shapes world: which shape, where, how big, drawn as edges or a blob; the
    control image redraws as the sliders move.

        editor = LayoutEditor()        # display editor.widget; editor.picture() is the control image
    """

    def __init__(self, *, shape: str = "circle", cx: float = 0.3, cy: float = 0.3, size: float = 0.45,
                 kind: str = "blob", px: int = 128) -> None:
        import ipywidgets as w

        from sdkit.widgets import png

        self._png = png
        self.shape = w.Dropdown(options=list(data.SHAPES), value=shape, description="shape")
        self.kind = w.ToggleButtons(options=list(KINDS), value=kind, description="drawn as")
        self.x = w.FloatSlider(value=cx, min=0.2, max=0.8, step=0.01, description="x", continuous_update=False)
        self.y = w.FloatSlider(value=cy, min=0.2, max=0.8, step=0.01, description="y", continuous_update=False)
        self.size = w.FloatSlider(value=size, min=data.MIN_SIZE, max=0.6, step=0.01, description="size",
                                  continuous_update=False)
        self.image = w.Image(format="png", layout=w.Layout(width=f"{px}px", height=f"{px}px"))  # not stretched
        self.image.add_class("sdkit-layout-image")
        for name, control in (("shape", self.shape), ("kind", self.kind), ("x", self.x), ("y", self.y),
                              ("size", self.size)):
            control.add_class(f"sdkit-layout-{name}")
            control.observe(lambda _c: self._redraw(), names="value")
        self._redraw()
        self.widget = w.HBox([self.image, w.VBox([self.shape, self.kind, self.x, self.y, self.size])])

    def spec(self) -> data.ShapeSpec:
        """The layout as a shapes-world spec (its colour and background are not part of the control image)."""
        return data.ShapeSpec(shape=self.shape.value, colour="red", background="white", size=self.size.value,
                              cx=self.x.value, cy=self.y.value)

    def picture(self) -> Image.Image:
        """The control image of the layout as it stands, 64 px."""
        return control_image(self.spec(), kind=self.kind.value)

    def _redraw(self) -> None:
        self.image.value = self._png(self.picture(), min_px=128)
