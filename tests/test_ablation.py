"""The ablation's layer: DoRA's parameters and starting point, without the normalisation."""

import torch
from torch import nn


def test_scaled_lora_is_dora_without_the_normalisation(nb):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    scaled, dora = nb.LinearWithScaledLoRA(base, 3, 6), nb.LinearWithDoRA(base, 3, 6)
    x = torch.randn(5, 12)
    assert torch.allclose(scaled(x), base(x), atol=1e-6)  # it starts at W0, as DoRA does
    assert [n for n, _ in scaled.named_parameters()] == [n for n, _ in dora.named_parameters()]
    with torch.no_grad():
        scaled.lora.B.normal_()
        scaled.m.mul_(torch.linspace(0.5, 1.5, 7))
    dora.load_state_dict(scaled.state_dict())
    V = base.weight + scaled.lora.delta_weight()
    expected = (scaled.m / base.weight.norm(dim=1)).unsqueeze(1) * V  # m / ||W0[n]|| scales a row
    assert torch.allclose(scaled.merged_weight(), expected)
    assert not torch.allclose(scaled(x), dora(x), atol=1e-3)  # rows of V longer than W0's
    with torch.no_grad():
        scaled.lora.B.zero_()  # V = W0: then the normalisation changes nothing
    dora.load_state_dict(scaled.state_dict())
    assert torch.allclose(scaled(x), dora(x), atol=1e-6)
