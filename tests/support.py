"""What several test files share, defined once: test modules import this, never each other.

looks_trained(model_or_layer)   adapter values as after training (B != 0, m != ||W0||)
rel(a, b)                       the largest difference relative to the largest entry of b
tiny_task()                     a small separable 10-class problem, as a helpers.Task
solo_run(...)                   one model, one seed, a plain Adam loop (batched == solo)
load_error(...)                 the ValueError a bad adapter raises, the model untouched
assert_detach_changes_only_direction_gradients(...)
wrappers(nb, kind)              the notebook's LoRA or DoRA class per layer type
peft_with_values_of_its_own(...), assert_matches_peft(...), PEFT_TOL   (PEFT parity)
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import nn

import helpers

PEFT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
OURS_TO_PEFT = {
    "lora.A": "lora_A.default.weight",
    "lora.B": "lora_B.default.weight",
    "m": "lora_magnitude_vector.default.weight",
}


def looks_trained(module: nn.Module, seed: int = 1, b_std: float = 1.0, m_spread: float = 1.0):
    """Adapters as after training, in place: every ``lora.B`` drawn from N(0, b_std^2), every
    magnitude ``m`` scaled by 1 + m_spread * U(0, 1). A layer or a whole model; returns it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "lora.B" or name.endswith(".lora.B"):
                p.copy_(b_std * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name == "m" or name.endswith(".m"):
                p.mul_(1 + m_spread * torch.rand(p.shape, generator=g, dtype=p.dtype))
    return module


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b = 0 counts as 1e-30)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def tiny_task(n=256, seed=0):
    """A linearly separable 10-class problem in 784 dimensions, as a helpers.Task."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 784, generator=g) * 3
    y = torch.randint(0, 10, (n,), generator=g)
    x = centers[y] + torch.randn(n, 784, generator=g)
    return helpers.Task(train_x=x, train_y=y, test_x=x[:64], test_y=y[:64])


def solo_run(model, task, seed, epochs, lr, batch_size):
    """One model, one seed: the batch order from the seed's own generator, plain Adam."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(task.train_x), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(task.train_x[idx]), task.train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def load_error(model, adapter, load=helpers.load_adapter) -> str:
    """The ValueError's message of ``load(model, adapter)``; the model must be untouched."""
    import pytest

    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as info:
        load(model, adapter)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "model changed on error"
    return str(info.value)


def assert_detach_changes_only_direction_gradients(detached, exact, x):
    """Given exact's parameters set to detached's: the same output and gradient of m, other
    gradients of A and B (the norm's derivative is what the detach drops)."""
    exact.load_state_dict(detached.state_dict())
    y_d, y_e = detached(x), exact(x)
    assert torch.equal(y_d, y_e)
    y_d.square().sum().backward()
    y_e.square().sum().backward()
    for name in ("lora.A", "lora.B"):
        g_d, g_e = detached.get_parameter(name).grad, exact.get_parameter(name).grad
        assert (g_d - g_e).norm() > 1e-3 * g_e.norm(), name
    torch.testing.assert_close(detached.m.grad, exact.m.grad, rtol=1e-12, atol=1e-12)


def wrappers(nb, kind):
    """{nn.Linear: LinearWith<kind>, nn.Conv2d: Conv2dWith<kind>} from the notebook."""
    return {
        nn.Linear: getattr(nb, f"LinearWith{kind}"),
        nn.Conv2d: getattr(nb, f"Conv2dWith{kind}"),
    }


def peft_with_values_of_its_own(base, config):
    """get_peft_model on a copy of base, its adapter values moved (B != 0, m != ||W0||)."""
    from peft import get_peft_model

    theirs = get_peft_model(copy.deepcopy(base), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return theirs


def assert_matches_peft(ours, theirs, x, tol, merge):
    """Our model and PEFT's, same adapter values: the output, the gradient of every adapter
    parameter after one backward pass, the merged weights (``helpers.merge_adapters(ours,
    merge)`` against ``merge_and_unload``) within ``tol``. Returns how many gradients were
    compared. PEFT may keep a tensor in another shape (a Conv2d's m is (1, out, 1, 1))."""
    y_ours, y_theirs = ours(x), theirs(x)
    assert rel(y_ours, y_theirs) <= tol
    target = torch.randn_like(y_ours)
    (y_ours * target).sum().backward()
    (y_theirs * target).sum().backward()
    compared = 0
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        layer, _, ours_name = name.partition(".")
        q = theirs.get_parameter(f"base_model.model.{layer}.{OURS_TO_PEFT[ours_name]}")
        assert torch.equal(p.detach(), q.detach().reshape(p.shape))  # copied exactly
        assert rel(p.grad, q.grad.reshape(p.shape)) <= tol, name
        compared += 1
    merged_theirs = copy.deepcopy(theirs).merge_and_unload()
    merged_ours = helpers.merge_adapters(ours, merge)
    for (n1, w1), (n2, w2) in zip(
        merged_ours.state_dict().items(), merged_theirs.state_dict().items(), strict=True
    ):
        assert n1 == n2 and rel(w1, w2) <= tol, n1
    assert rel(merged_ours(x), y_theirs) <= 10 * tol
    return compared


def configured(model, rank, alpha, dropout=0.0):
    """PEFT's LoraConfig options from the rank and alpha the layers were asked for, not from
    what the layers record (a layer scaling by alpha instead of alpha / r would record that
    scaling and hand PEFT the same mistake). ``add_adapters`` gives a layer with fewer than
    ``rank`` inputs or outputs full rank: that layer's rank goes into ``rank_pattern``."""
    layers = {n: mod for n, mod in model.named_modules() if hasattr(mod, "lora")}
    bases = {n: mod.linear if hasattr(mod, "linear") else mod.conv for n, mod in layers.items()}
    ranks = {n: min(rank, *base.weight.flatten(1).shape) for n, base in bases.items()}
    return {
        "r": rank,
        "lora_alpha": alpha,
        "use_dora": all(hasattr(mod, "m") for mod in layers.values()),
        "lora_dropout": dropout,
        "target_modules": list(layers),
        "rank_pattern": {f"^{re.escape(n)}": r for n, r in ranks.items() if r != rank},
    }
