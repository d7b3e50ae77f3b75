"""Training scripts: deterministic, logged and exactly resumable (tiny plans; the real run is in the model card)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sdkit.shapes import train


@pytest.fixture
def tiny_plan(monkeypatch):
    monkeypatch.setitem(train.PLANS, "text", train.Plan(steps=6, batch=4, lr=1e-3, save_every=2))


def test_text_training_lowers_the_loss_and_logs(tmp_path, tiny_plan, monkeypatch):
    monkeypatch.setitem(train.PLANS, "text", train.Plan(steps=60, batch=16, lr=3e-3, save_every=60))
    train.train("text", runs=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "text.log").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert records[0]["event"] == "start" and records[-1]["event"] == "done"
    assert losses[-1] < 0.7 * losses[0]


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, tiny_plan, monkeypatch):
    straight = load_file(train.train("text", runs=tmp_path / "straight"))
    original = train._text_loss

    def stop_at_step_4(model, step, plan):
        if step == 4:
            raise KeyboardInterrupt
        return original(model, step, plan)

    monkeypatch.setattr(train, "_text_loss", stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.train("text", runs=tmp_path / "resumed")
    assert torch.load(tmp_path / "resumed" / "text.state.pt", weights_only=False)["step"] == 4
    monkeypatch.setattr(train, "_text_loss", original)
    resumed = load_file(train.train("text", runs=tmp_path / "resumed"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
