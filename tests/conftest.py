"""Shared fixtures: tests never touch the network or the user's models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """Tiny random sd1/sd2/sdxl checkpoints in their real key layouts, written once per test session."""
    from sdkit.testing import write_tiny

    folder = tmp_path_factory.mktemp("checkpoints")
    files = {family: folder / f"tiny-{family}.safetensors" for family in ("sd1", "sd2", "sdxl")}
    for family, path in files.items():
        write_tiny(family, path)
    return files
