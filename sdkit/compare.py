"""Compare settings side by side: one value per picture, in a labelled strip; also the panel's "Compare" group."""

from __future__ import annotations

from collections.abc import Sequence

import ipywidgets as w
from PIL import Image, ImageDraw, ImageFont

from sdkit.errors import SdkitError
from sdkit.generate import GenerationSettings
from sdkit.widgets import ControlGroup

# The fields a comparison can vary, and how a typed value becomes one.
FIELDS: dict[str, type] = {"cfg": float, "steps": int, "seed": int, "sampler": str, "scheduler": str,
                           "clip_skip": int, "prompt": str}
MAX_VALUES = 8
SEPARATOR = {"prompt": "|"}  # prompts hold commas


def parse_values(field: str, text: str) -> list:
    """The values typed for `field` ("1, 4, 7"; prompts separated by '|'), each checked."""
    if field not in FIELDS:
        raise SdkitError(f"compare: {field!r} can't be compared; these can: {', '.join(FIELDS)}.", fix="pick one of those")
    separator = SEPARATOR.get(field, ",")
    items = [item.strip() for item in text.split(separator) if item.strip()]
    if not 1 <= len(items) <= MAX_VALUES:
        raise SdkitError(f"compare: {len(items)} values for {field}; 1 to {MAX_VALUES} are shown side by side.",
                         fix=f"type values separated by '{separator}', e.g. " + ("a red circle | a blue circle"
                                                                               if field == "prompt" else "1, 4, 7"))
    try:
        return [FIELDS[field](item) for item in items]
    except ValueError:
        raise SdkitError(f"compare: {text!r} are not {FIELDS[field].__name__} values for {field}.",
                         fix=f"type numbers separated by commas, e.g. {field}: 1, 4, 7") from None


def variants(settings: GenerationSettings, *, field: str, values: Sequence) -> list[GenerationSettings]:
    """One copy of settings per value of field."""
    return [settings.replace(**{field: value}) for value in values]


def strip(images: Sequence[Image.Image], *, labels: Sequence[str], min_px: int = 128) -> Image.Image:
    """Pictures in a row, each at least min_px wide, with a label under each."""
    factor = max(1, -(-min_px // images[0].width))
    cell_w, cell_h = images[0].width * factor, images[0].height * factor
    font = ImageFont.load_default(size=max(11, cell_w // 14))
    label_h = font.size + 8
    out = Image.new("RGB", (cell_w * len(images), cell_h + label_h), "white")
    draw = ImageDraw.Draw(out)
    for i, (image, label) in enumerate(zip(images, labels)):
        out.paste(image.convert("RGB").resize((cell_w, cell_h), Image.Resampling.NEAREST), (i * cell_w, 0))
        draw.text((i * cell_w + 4, cell_h + 4), label[:40], fill="black", font=font)
    return out


class CompareGroup(ControlGroup):
    """The panel group: tick "compare", pick a setting and type its values; Generate makes one picture per value."""

    title = "Compare side by side"

    def __init__(self, *, field: str = "cfg", values: str = "1, 4, 7, 12", on: bool = False) -> None:
        self.on = w.Checkbox(value=on, description="compare", indent=False)
        self.field = w.Dropdown(options=list(FIELDS), value=field, description="vary")
        self.values = w.Text(value=values, description="values", continuous_update=False,
                             placeholder="1, 4, 7 (prompts: a | b)")
        for control, name in ((self.on, "on"), (self.field, "field"), (self.values, "values")):
            control.add_class(f"sdkit-compare-{name}")
        self.widgets = [w.HBox([self.on, self.field]), self.values]

    def variants(self, settings: GenerationSettings) -> list[GenerationSettings]:
        """One run per value when "compare" is ticked."""
        if not self.on.value:
            return [settings]
        return variants(settings, field=self.field.value, values=parse_values(self.field.value, self.values.value))

    def compose(self, images: list[Image.Image], settings: list[GenerationSettings]) -> Image.Image | None:
        """The strip of pictures, labelled with the value that differs (read from the runs, not the controls)."""
        field = next((f for f in FIELDS if len({getattr(s, f) for s in settings}) > 1), None)
        if field is None:
            return None
        return strip(images, labels=[f"{field} {getattr(s, field)}" for s in settings])
