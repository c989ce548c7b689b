"""The DoRA layers' kept value (InferenceCache) seen from a whole model: after an optimiser
changes the parameters in place, an eval-mode, no-grad forward computes the new function.

The reference is the merged model (helpers.merge_adapters: plain nn.Linear layers built from
each layer's merged_weight(), which never reads the cache). tests/test_inference_cache.py checks
the same layer by layer."""

import pytest
import torch
import torch.nn.functional as F

import helpers

DORA_CLASSES = ["DoRALinear"]  # Part I's layer keeps nothing
OPTIMIZERS = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
    "Adam": lambda params: torch.optim.Adam(params, lr=0.05, foreach=False),
    "Adam-foreach": lambda params: torch.optim.Adam(params, lr=0.05, foreach=True),
    "Adam-fused": lambda params: torch.optim.Adam(params, lr=0.05, fused=True),
}
# A fused step writes the parameters without bumping their version counters, so a value kept
# between backward and that step is not seen to be stale (helpers.train is not affected: it
# steps stacked stand-ins, which the cache never keeps anything for).


def model_and_data(nb, cls):
    base = helpers.make_mlp((20, 16, 12, 5)).double()
    model = helpers.add_adapters(base, getattr(nb, cls), 3, 5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 20, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (32,), generator=g)
    return model, x, y


def evaluate(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def merged(model, nb, x):
    with torch.no_grad():
        return helpers.merge_adapters(model, nb.merge)(x)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("cls", DORA_CLASSES)
def test_evaluation_between_backward_and_step_then_after_the_step(nb, cls, optimizer):
    """The loop: backward, validate (eval, no grad: the kept values fill), step in place,
    validate again. The second validation must see the stepped weights."""
    model, x, y = model_and_data(nb, cls)
    opt = OPTIMIZERS[optimizer]([p for p in model.parameters() if p.requires_grad])
    for _ in range(3):
        model.train()
        F.cross_entropy(model(x), y).backward()
        before = evaluate(model, x)
        torch.testing.assert_close(before, merged(model, nb, x), rtol=1e-12, atol=1e-12)
        opt.step()
        opt.zero_grad()
        after = evaluate(model, x)
        assert (after - before).abs().max() > 1e-3  # the step changed the function
        torch.testing.assert_close(after, merged(model, nb, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", DORA_CLASSES)
def test_no_grad_accuracy_after_an_in_place_update_of_every_adapter(nb, cls):
    """Accuracy under torch.no_grad before and after the adapters are changed in place (as an
    optimiser does): the second reads the new model."""
    model, x, y = model_and_data(nb, cls)
    with torch.no_grad():
        helpers.accuracy(model, x, y)  # the kept values fill
    logits_before = evaluate(model, x)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    logits_after = evaluate(model, x)
    assert (logits_after - logits_before).abs().max() > 0.1
    torch.testing.assert_close(logits_after, merged(model, nb, x), rtol=1e-12, atol=1e-12)
    expected = (merged(model, nb, x).argmax(1) == y).double().mean().item()
    assert expected != (logits_before.argmax(1) == y).double().mean().item()
    with torch.no_grad():
        assert helpers.accuracy(model, x, y) == pytest.approx(expected)
