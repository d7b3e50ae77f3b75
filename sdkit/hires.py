"""The panel's hires-fix controls: A1111's second pass at a larger size, as a ControlGroup.

    start = GenerationSettings(prompt="a red circle", hires_scale=2, strength=0.5)
    panel = widgets.Panel("shapes-v1", settings=start, groups=[hires.control_group()])

The pass itself is `GenerationSettings(hires_scale=..., strength=..., hires_steps=..., hires_upscaler=...)` in
`sdkit.generate`; this group only sets those fields from sliders and reads them back from a picture's settings. As with every group,
a panel given settings shows them at the start (here: the hires fix off unless they have hires_scale > 1, the
group's own arguments then being the values it offers when the learner turns it on); a panel without settings
shows each group as it was built.
"""

from __future__ import annotations

from pathlib import Path


def control_group(*, on: bool = True, scale: float = 2.0, strength: float = 0.5, steps: int = 0,
                  upscaler: str = "Latent"):
    """A panel group: hires fix on/off, its upscale factor, denoising strength, steps and upscaler (the built-in
    ones, then the upscale models found in the models folders)."""
    import ipywidgets as w

    from sdkit.generate import HIRES_UPSCALERS
    from sdkit.widgets import ControlGroup

    class HiresGroup(ControlGroup):
        title = "Hires fix"

        def __init__(self) -> None:
            self.on = w.Checkbox(value=on, description="hires fix")
            self.scale = w.FloatSlider(value=scale, min=1.0, max=4.0, step=0.25, description="upscale by",
                                       continuous_update=False)
            self.strength = w.FloatSlider(value=strength, min=0.05, max=1.0, step=0.05,
                                          description="denoising", continuous_update=False)
            self.steps = w.IntSlider(value=steps, min=0, max=150, description="hires steps", continuous_update=False)
            options = list(HIRES_UPSCALERS) + _models()
            self.upscaler = w.Dropdown(options=options, value=upscaler if upscaler in options else "Latent",
                                       description="upscaler")
            for widget, name in ((self.on, "on"), (self.scale, "scale"), (self.strength, "strength"),
                                 (self.steps, "steps"), (self.upscaler, "upscaler")):
                widget.add_class(f"sdkit-hires-{name}")
            self.widgets = [self.on, self.scale, self.strength, self.steps, self.upscaler]

        def update(self, settings):
            """The hires fields from the controls (off: no hires pass)."""
            if not self.on.value:
                return settings.replace(hires_scale=1.0)
            return settings.replace(hires_scale=self.scale.value, strength=self.strength.value,
                                    hires_steps=self.steps.value, hires_upscaler=self.upscaler.value)

        def show(self, settings) -> None:
            """An earlier picture's hires settings back into the controls (none: the hires fix off)."""
            self.on.value = settings.hires_scale > 1
            if settings.hires_scale > 1:
                self.scale.value, self.strength.value = settings.hires_scale, settings.strength
                self.steps.value = settings.hires_steps
                if settings.hires_upscaler in self.upscaler.options:
                    self.upscaler.value = settings.hires_upscaler

    return HiresGroup()


def _models() -> list[str]:
    """The upscale models in the models folders, by name (what the dropdown offers after the built-in ones)."""
    from sdkit.paths import ModelPaths

    return [str(Path(name).with_suffix("")) for name in ModelPaths.from_root(None).list("upscale_models")]
