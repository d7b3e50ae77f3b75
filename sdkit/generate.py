"""GenerationSettings -> images: samplers by their common names, progress, cancel."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sdkit.errors import SdkitError

SIZE_MIN, SIZE_MAX = 8, 4096


@dataclass
class GenerationSettings:
    """Everything that decides an image, with A1111's meanings."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "euler_a"
    scheduler: str = "normal"
    width: int = 512
    height: int = 512
    batch_size: int = 1
    clip_skip: int = 1
    model: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.sampler.endswith("_karras"):
            self.sampler, self.scheduler = self.sampler[: -len("_karras")], "karras"

    def replace(self, **changes: object) -> "GenerationSettings":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """Raise a clear error for a setting no model can run."""
        for name in ("width", "height"):
            value = getattr(self, name)
            if value % 8 or not SIZE_MIN <= value <= SIZE_MAX:
                raise SdkitError(
                    f"{name}={value} is not usable: it must be a multiple of 8 between {SIZE_MIN} and {SIZE_MAX}.",
                    fix=f"use {name}={max(SIZE_MIN, min(SIZE_MAX, round(value / 8) * 8))}",
                )
        if self.steps < 1:
            raise SdkitError(f"steps={self.steps} is not usable: at least 1 step is needed.", fix="use steps=20")
        if self.batch_size < 1:
            raise SdkitError(f"batch_size={self.batch_size} is not usable: at least 1.", fix="use batch_size=1")
        if self.clip_skip < 1:
            raise SdkitError(f"clip_skip={self.clip_skip} is not usable: 1 means the last layer.", fix="use clip_skip=1")
        if self.scheduler not in ("normal", "karras"):
            raise SdkitError(f"scheduler={self.scheduler!r} is unknown; known: normal, karras.", fix="use scheduler='normal'")
