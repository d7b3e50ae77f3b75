from __future__ import annotations

import torch

from sdkit.standins import StandIns


def test_nested_stand_ins_put_each_forward_back_in_turn():
    layer = torch.nn.Linear(2, 2)
    x = torch.ones(1, 2)
    plain = layer(x)
    outer, inner = StandIns(), StandIns()
    outer.replace(layer, lambda forward: lambda t: forward(t) + 1)
    inner.replace(layer, lambda forward: lambda t: forward(t) * 10)
    assert torch.allclose(layer(x), (plain + 1) * 10)
    inner.restore()
    assert torch.allclose(layer(x), plain + 1)
    outer.restore()
    assert torch.allclose(layer(x), plain) and "forward" not in layer.__dict__
