"""sdkit: make AI images without a discrete GPU. The public API, re-exported lazily."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "SdkitError": "sdkit.errors",
    "GenerationSettings": "sdkit.generate",
    "generate": "sdkit.generate",
    "SAMPLERS": "sdkit.generate",
    "load": "sdkit.checkpoints",
    "info": "sdkit.formats",
    "find": "sdkit.paths",
    "ModelPaths": "sdkit.paths",
    "report": "sdkit.device",
    "save_image": "sdkit.metadata",
    "read_parameters": "sdkit.metadata",
}


def __getattr__(name: str) -> Any:
    """Import heavy modules (torch, diffusers) only when their names are used."""
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'sdkit' has no attribute {name!r}")


__all__ = list(_API)
