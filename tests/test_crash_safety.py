"""Nothing lost: a killed run leaves no partial PNG, and the pipeline stays usable after a cancel, an error, and a
LoRA, ControlNet or VAE load that fails half-way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from sdkit import checkpoints, controlnet, loras, vae
from sdkit.generate import Cancelled, GenerationSettings, generate
from sdkit.paths import BUNDLED_ROOT

RUN = GenerationSettings(prompt="a blue square on a black background", seed=4, steps=3, width=64, height=64)

# The CLI, with the last step of writing the PNG (its fsync) held until the parent kills the process.
KILLED_MID_WRITE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path

    flag = Path(sys.argv[1])

    def held(fd):
        flag.write_text("writing")
        time.sleep(60)

    os.fsync = held
    from sdkit.__main__ import main
    main(["generate", "--model", "shapes-v1", "--prompt", "a red circle", "--steps", "2", "--out", sys.argv[2], "--quiet"])
""")


@pytest.fixture(scope="module")
def shapes():
    return checkpoints.load("shapes-v1")


@pytest.fixture(scope="module")
def reference(shapes):
    return np.asarray(generate(shapes, RUN, progress=False)[0])


def same(shapes, reference) -> bool:
    return np.array_equal(np.asarray(generate(shapes, RUN, progress=False)[0]), reference)


def test_sigkill_while_writing_leaves_no_partial_png(tmp_path):
    out, flag = tmp_path / "out", tmp_path / "flag"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(flag), str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flag.exists(), "the child never reached the write"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    assert list(out.glob("*.png")) == [], "no PNG, whole or partial, under a real name"
    leftovers = list(out.iterdir())
    assert all(p.name.startswith(".sdkit-") and p.name.endswith(".tmp") for p in leftovers)  # a hidden temp file only


def test_usable_after_a_cancel(shapes, reference):
    with pytest.raises(Cancelled):
        generate(shapes, RUN, progress=False, cancel=lambda: True)
    assert same(shapes, reference)


def test_usable_after_an_error_during_generation(shapes, reference, monkeypatch):
    calls = {"n": 0}
    real = shapes.unet.forward

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure at step 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(shapes.unet, "forward", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        generate(shapes, RUN, progress=False)
    monkeypatch.undo()
    assert same(shapes, reference)


def test_a_lora_that_fails_half_way_leaves_the_painter_as_it_was(shapes, reference, monkeypatch):
    lora = loras.load(BUNDLED_ROOT / "loras" / "outlines.safetensors")
    calls = {"n": 0}
    real = loras.Layer.delta

    def failing(self, shape):
        calls["n"] += 1
        if calls["n"] == 5:  # after four layers were already changed
            raise MemoryError("simulated out of memory")
        return real(self, shape)

    monkeypatch.setattr(loras.Layer, "delta", failing)
    with pytest.raises(MemoryError):
        loras.apply(shapes, [(lora, 1.0)])
    monkeypatch.undo()
    assert loras.active(shapes) == []
    assert same(shapes, reference)


def test_a_controlnet_that_fails_half_way_changes_nothing(shapes, reference, monkeypatch):
    monkeypatch.setattr(controlnet, "_check_fits", lambda *a, **k: (_ for _ in ()).throw(MemoryError("simulated")))
    shapes.__dict__.pop("_sdkit_controlnets", None)
    with pytest.raises(MemoryError):
        controlnet.load("shapes-v1-layout", pipe=shapes)
    monkeypatch.undo()
    assert same(shapes, reference)


def test_a_vae_that_fails_half_way_changes_nothing(shapes, reference, monkeypatch):
    chosen = vae.load("shapes-v1-warm")
    monkeypatch.setattr(vae, "_prepared", lambda model: (_ for _ in ()).throw(MemoryError("simulated")))
    with pytest.raises(MemoryError):
        vae.apply(shapes, chosen)
    monkeypatch.undo()
    assert same(shapes, reference)
    vae.restore(shapes)
