"""The panel's hires-fix group on the tiny SD1 model."""

from __future__ import annotations

import numpy as np

from sdkit import checkpoints, hires, widgets
from sdkit.generate import GenerationSettings

FAST = GenerationSettings(prompt="a red circle", seed=2, steps=3, width=32, height=32)


def test_the_group_sets_the_hires_pass_and_use_brings_it_back(tiny_files):
    pipe = checkpoints.load(tiny_files["sd1"])
    group = hires.control_group(on=False)
    panel = widgets.Panel(pipe, settings=FAST.replace(hires_scale=2.0, strength=0.5), groups=[group], auto_run=False)
    assert group.on.value and group.scale.value == 2.0, "the panel's settings decide what the group shows"
    panel.generate(wait=True)
    assert "Done" in panel.status.value, panel.status.value
    shot = panel.gallery[0]
    assert shot.image.size == (64, 64) and "Hires upscale: 2" in shot.parameters
    group.on.value = False
    panel.generate(wait=True)
    assert panel.gallery[0].image.size == (32, 32)
    panel.show(shot.settings)
    assert group.on.value and group.scale.value == 2.0 and group.strength.value == 0.5
    panel.generate(wait=True)
    assert np.array_equal(np.asarray(panel.gallery[0].image), np.asarray(shot.image))
