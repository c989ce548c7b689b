"""Seeds trained at once equal the same seeds trained one at a time; seeds pair configurations.

The reference below is the plainest training loop there is: one model, one Adam, one batch at a
time. ``helpers.train`` stacks the seeds' parameters and runs them under ``torch.func.vmap`` with
one Adam over the stacks; seed k must come out as the reference run of seed k (same init, same
batches), up to float rounding.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import helpers
from support import solo_run, tiny_task

SIZES = (784, 32, 16, 10)
CLASSES = [None, "LinearWithLoRA", "LinearWithDoRA", "DoRALinear"]


def build(nb, wrapper, seed, pretrained):
    """What helpers.finetune builds for one seed, written out."""
    helpers.seed_everything(seed)
    if wrapper is None:
        return copy.deepcopy(pretrained).requires_grad_(True)
    return helpers.add_adapters(pretrained, getattr(nb, wrapper), 4, 8)


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", CLASSES, ids=["full", "lora", "dora", "dora-efficient"])
def test_each_batched_seed_equals_its_solo_run(nb, wrapper):
    pretrained, task, seeds = helpers.make_mlp(SIZES, seed=0), tiny_task(), (0, 1, 2)
    runs = helpers.finetune(
        pretrained,
        task,
        seeds=seeds,
        wrapper=wrapper and getattr(nb, wrapper),
        epochs=2,
        lr=3e-3,
        batch_size=32,
        log=None,
    )
    for k, seed in enumerate(seeds):
        solo = solo_run(build(nb, wrapper, seed, pretrained), task, seed, 2, 3e-3, 32)
        for name, p in solo.named_parameters():
            q = runs.models[k].get_parameter(name)
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=f"seed {seed}: {name}")
        accuracy = helpers.accuracy(solo, task.test_x, task.test_y)
        assert runs.test_acc[k, -1] == pytest.approx(accuracy, abs=1 / len(task.test_x))
    assert not torch.equal(runs.models[0].get_parameter(name), runs.models[1].get_parameter(name))


def test_seed_k_gives_every_configuration_the_same_start_and_batches(nb, monkeypatch):
    """LoRA, DoRA and exact-gradient DoRA of seed k: same initial A, same batch order."""
    pretrained, task, seeds = helpers.make_mlp(SIZES, seed=0), tiny_task(), (3, 7)
    started, orders = {}, {}
    real_train, real_orders = helpers.train, helpers.batch_orders

    def recording_orders(seeds, n):
        generator = real_orders(seeds, n)
        first = next(generator)
        orders[current] = first.clone()
        yield first
        yield from generator

    def recording_train(models, task, **kwargs):
        started[current] = [m.get_parameter("0.lora.A").detach().clone() for m in models]
        return real_train(models, task, **kwargs)

    monkeypatch.setattr("dora_tutorial.training.train", recording_train)  # finetune calls it
    monkeypatch.setattr("dora_tutorial.training.batch_orders", recording_orders)
    configurations = {
        "LoRA": dict(wrapper=nb.LinearWithLoRA),
        "DoRA": dict(wrapper=nb.LinearWithDoRA),
        "DoRA, exact": dict(wrapper=nb.LinearWithDoRA, layer_kwargs={"detach_norm": False}),
    }
    for current, setting in configurations.items():  # noqa: B007 (read by the recorders)
        helpers.finetune(
            pretrained, task, seeds=seeds, epochs=1, lr=1e-3, batch_size=64, log=None, **setting
        )
    for name in ("DoRA", "DoRA, exact"):
        assert all(torch.equal(a, b) for a, b in zip(started[name], started["LoRA"], strict=True))
        assert torch.equal(orders[name], orders["LoRA"])
    assert not torch.equal(started["LoRA"][0], started["LoRA"][1])  # seeds differ


def test_a_seeds_batch_order_does_not_depend_on_its_neighbours():
    together = next(helpers.batch_orders((3, 7), 50))
    assert torch.equal(together[0], next(helpers.batch_orders((3,), 50))[0])
    assert torch.equal(together[1], next(helpers.batch_orders((7,), 50))[0])
    assert sorted(together[1].tolist()) == list(range(50))


def test_evaluation_on_the_validation_set(nb):
    task = tiny_task()
    task.val_x, task.val_y = task.train_x[64:128], (task.train_y[64:128] + 1) % 10  # wrong labels
    model = helpers.make_mlp(SIZES, seed=0)
    runs = helpers.train(model, task, epochs=2, lr=3e-3, batch_size=32, evaluate_on="val", log=None)
    assert runs.final[0] < 20  # trained on the right labels, scored on wrong ones
    assert np.isclose(runs.test_acc[0, -1], helpers.accuracy(model, task.val_x, task.val_y))


# ---- "Is DoRA really training?": the magnitude through helpers.finetune ----------------------


def magnitude_moves(runs, pretrained):
    """For every seed and DoRA layer: the largest |m_n - ||W0[n]||| after training."""
    weights0 = helpers.layer_weights(pretrained)
    return [
        (layer.m.detach() - weights0[name].norm(dim=1)).abs().max().item()
        for model in runs.models
        for name, layer in helpers.adapter_layers(model).items()
    ]


SHORT = {"seeds": (0, 1), "epochs": 1, "lr": 3e-3, "batch_size": 32, "log": None}


def dora_runs(nb, wrapper, pretrained, **kwargs):
    return helpers.finetune(pretrained, tiny_task(), wrapper=wrapper, **SHORT, **kwargs)


def test_dora_magnitude_trains_in_every_layer_and_seed(nb):
    pretrained = helpers.make_mlp(SIZES, seed=0)
    runs = dora_runs(nb, nb.LinearWithDoRA, pretrained)
    lora = helpers.add_adapters(pretrained, nb.LinearWithLoRA, 4, 8)
    assert runs.trainable == helpers.parameter_counts(lora)[0] + sum(SIZES[1:])  # m is stacked
    assert min(magnitude_moves(runs, pretrained)) > 1e-4
    same_seed_lora = dora_runs(nb, nb.LinearWithLoRA, pretrained)
    for dora, lora in zip(runs.models, same_seed_lora.models, strict=True):
        gap = [
            (w - helpers.layer_weights(lora)[name]).abs().max()
            for name, w in helpers.layer_weights(dora).items()
        ]
        assert min(gap) > 1e-4  # same A and batches, another method: other weights


def test_the_magnitude_check_fails_when_m_is_not_trained(nb):
    """The check above catches both ways m can silently stop training."""

    class NotHeld(nb.LinearWithDoRA):  # m frozen: the optimizer does not hold it
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.m.requires_grad_(False)

    class NoGradient(nb.LinearWithDoRA):  # m trainable, but no gradient reaches it
        def forward(self, x):
            V = self.linear.weight + self.lora.delta_weight()
            W = self.m.detach().unsqueeze(1) * V / nb.row_norm(V).unsqueeze(1).detach()
            return F.linear(x, W, self.linear.bias)

    pretrained = helpers.make_mlp(SIZES, seed=0)
    for broken in (NotHeld, NoGradient):
        assert max(magnitude_moves(dora_runs(nb, broken, pretrained), pretrained)) == 0.0


@pytest.mark.parametrize("wrapper", ["LoRALinear", "DoRALinear"], ids=["lora", "dora"])
def test_dropout_trains_per_seed_and_evaluates_without_masks(nb, wrapper):
    pretrained = helpers.make_mlp(SIZES, seed=0)
    layer_kwargs = {"dropout": 0.5}
    runs = dora_runs(nb, getattr(nb, wrapper), pretrained, layer_kwargs=layer_kwargs)
    task = tiny_task()
    for k, model in enumerate(runs.models):  # the accuracies were measured in eval mode
        assert model.training
        accuracy = helpers.accuracy(model, task.test_x, task.test_y)
        assert runs.test_acc[k, -1] == pytest.approx(accuracy, abs=1e-9)
    assert all(layer.dropout == 0.5 for layer in helpers.adapter_layers(runs.models[0]).values())


def test_evaluation_of_a_layer_that_adds_in_place(nb):
    """Evaluation shares the inputs across seeds (unbatched); a layer that adds a seed's update
    in place to the frozen x W0^T is refused by vmap that way and is evaluated batched."""

    class InPlace(nb.LinearWithLoRA):
        def forward(self, x):
            h = self.linear(x)
            h += self.lora(x)
            return h

    pretrained, task = helpers.make_mlp(SIZES, seed=0), tiny_task()
    runs = dora_runs(nb, InPlace, pretrained)
    for k, model in enumerate(runs.models):
        accuracy = helpers.accuracy(model, task.test_x, task.test_y)
        assert runs.test_acc[k, -1] == pytest.approx(accuracy, abs=1e-9)
