"""What several test files share, defined once: test modules import this, never each other."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import helpers


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


def small_cnn(dtype=torch.float64):
    """Two convolutions and two linear layers on MNIST-sized rows."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU()]
    head = [nn.Flatten(), nn.Linear(8 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, 10)]
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), *convs, *head).to(dtype)


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
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as info:
        load(model, adapter)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "model changed on error"
    return str(info.value)


LINEAR = ["LinearWithLoRA", "LoRALinear", "LinearWithDoRA"]
LINEAR += ["DoRALinear-factored", "DoRALinear-dense"]  # the efficient layer's two norms


def make_layer(nb, key, base, rank, alpha, **kwargs):
    """The notebook's class named by key, on base; DoRALinear-factored / -dense pick the norm."""
    name, _, norm = key.partition("-")
    options = {"factored_norm": norm == "factored"} if norm else {}
    return getattr(nb, name)(base, rank, alpha, **options, **kwargs)


def wrappers(nb, kind):
    """{nn.Linear: LinearWith<kind>, nn.Conv2d: Conv2dWith<kind>} from the notebook."""
    return {base: getattr(nb, f"{base.__name__}With{kind}") for base in (nn.Linear, nn.Conv2d)}


def merges(nb):
    """merge_conv for the convolution adapters, merge for every other: helpers.merge_adapters."""
    return {nb.Conv2dWithLoRA: nb.merge_conv, nb.Conv2dWithDoRA: nb.merge_conv, nn.Module: nb.merge}


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
