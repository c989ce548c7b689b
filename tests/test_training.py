"""helpers.train and finetune: seeds trained at once equal the same seeds trained one at a time
(the reference is the plainest loop: one model, one Adam, one batch at a time); seed k pairs
configurations; what is logged and evaluated; DoRA's magnitude really trains."""

import copy

import numpy as np
import pytest
import torch

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
    kw = dict(epochs=2, lr=3e-3, batch_size=32, log=None)
    runs = helpers.finetune(
        pretrained, task, seeds=seeds, wrapper=wrapper and getattr(nb, wrapper), **kw
    )
    for k, seed in enumerate(seeds):
        solo = solo_run(build(nb, wrapper, seed, pretrained), task, seed, 2, 3e-3, 32)
        for name, p in solo.named_parameters():
            q = runs.models[k].get_parameter(name)
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=f"seed {seed}: {name}")
        accuracy = helpers.accuracy(solo, task.test_x, task.test_y)
        assert runs.test_acc[k, -1] == pytest.approx(accuracy, abs=1 / len(task.test_x))
    assert not torch.equal(runs.models[0].get_parameter(name), runs.models[1].get_parameter(name))


def test_seed_k_gives_every_configuration_the_same_start(nb):
    """Seed k's A is the same for LoRA and both DoRAs (lr 0 keeps it); its batches depend on
    the seed alone (next test): configurations run with the same seeds are paired."""
    kw = dict(seeds=(3, 7), epochs=1, lr=0.0, batch_size=64, log=None)
    pretrained, task = helpers.make_mlp(SIZES, seed=0), tiny_task()
    starts = [
        [
            m.get_parameter("0.lora.A")
            for m in helpers.finetune(pretrained, task, wrapper=w, **kw).models
        ]
        for w in (nb.LinearWithLoRA, nb.LinearWithDoRA, nb.DoRALinear)
    ]
    assert all(
        torch.equal(a, b) for other in starts[1:] for a, b in zip(starts[0], other, strict=True)
    )
    assert not torch.equal(*starts[0])


def test_a_seeds_batch_order_does_not_depend_on_its_neighbours():
    together = next(helpers.batch_orders((3, 7), 50))
    assert torch.equal(together[0], next(helpers.batch_orders((3,), 50))[0])
    assert torch.equal(together[1], next(helpers.batch_orders((7,), 50))[0])
    assert sorted(together[1].tolist()) == list(range(50))


def test_train_learns_logs_each_epoch_and_scores_the_set_asked_for():
    task, lines = tiny_task(), []
    task.val_x, task.val_y = task.train_x[64:128], (task.train_y[64:128] + 1) % 10  # wrong labels
    model = helpers.make_mlp(SIZES, seed=0)
    runs = helpers.train(model, task, epochs=3, lr=3e-3, batch_size=32, log=lines.append)
    assert runs.train_loss.shape == runs.test_acc.shape == (1, 3) and runs.models == [model]
    assert runs.train_loss[0, -1] < 0.5 * runs.train_loss[0, 0] and runs.final[0] > 90
    assert runs.test_acc[0, -1] == helpers.accuracy(model, task.test_x, task.test_y)
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3: train loss")
    runs = helpers.train(model, task, epochs=1, lr=3e-3, batch_size=32, evaluate_on="val", log=None)
    assert runs.final[0] < 20  # trained on the right labels, scored on wrong ones
    eye = torch.nn.Linear(3, 3, bias=False).requires_grad_(False)
    eye.weight.copy_(torch.eye(3))
    assert helpers.accuracy(eye, torch.eye(3), torch.tensor([0, 2, 1]), batch_size=2) == 1 / 3


@pytest.mark.parametrize(
    "models, seeds, message",
    [
        (lambda nb: [helpers.make_mlp(SIZES).requires_grad_(False)], (0,), "no trainable"),
        (lambda nb: [helpers.make_mlp(SIZES)] * 2, (0,), "2 models need 2 seeds"),
        (
            lambda nb: [
                helpers.add_adapters(helpers.make_mlp(SIZES, seed=s), nb.LinearWithLoRA, 2, 4)
                for s in (0, 1)
            ],
            (0, 1),
            "share their frozen weights",
        ),
    ],
)
def test_train_refuses_what_it_cannot_train_together(nb, models, seeds, message):
    with pytest.raises(ValueError, match=message):
        helpers.train(
            models(nb), tiny_task(), seeds=seeds, epochs=1, lr=1e-3, batch_size=32, log=None
        )


def test_checkpoints_and_curves_false_change_nothing_else(nb):
    base, task = helpers.make_mlp(SIZES, seed=0), tiny_task()
    kw = dict(wrapper=nb.LinearWithDoRA, seeds=(3, 4), epochs=2, lr=1e-3, batch_size=64)
    every = helpers.finetune(base, task, record_weights=True, log=None, **kw)
    lines = []
    last = helpers.finetune(base, task, curves=False, log=lines.append, **kw)
    assert len(every.weights) == 2 and len(every.weights[0]) == 2 and last.weights == []
    final = helpers.layer_weights(every.models[1])
    assert all(torch.equal(final[k], every.weights[1][-1][k]) for k in final)
    assert np.isnan(last.test_acc[:, :-1]).all() and "not measured" in lines[0]
    np.testing.assert_array_equal(last.final, every.final)
    np.testing.assert_array_equal(last.train_loss, every.train_loss)
    assert every.trainable == helpers.parameter_counts(every.models[0])[0]
    full = helpers.finetune(base, task, seeds=(3,), epochs=1, lr=1e-3, batch_size=64, log=None)
    assert full.trainable == helpers.parameter_counts(base)[0]


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


def in_place(nb):
    class InPlace(nb.LinearWithLoRA):  # adds a seed's update in place to the frozen x W0^T
        def forward(self, x):
            h = self.linear(x)
            h += self.lora(x)
            return h

    return InPlace


@pytest.mark.parametrize(
    "wrapper, kwargs",
    [
        (lambda nb: nb.LoRALinear, {"dropout": 0.5}),
        (lambda nb: nb.DoRALinear, {"dropout": 0.5}),
        (in_place, {}),
    ],
    ids=["lora-dropout", "dora-dropout", "in-place"],
)
def test_evaluation_is_each_models_own_accuracy_in_eval_mode(nb, wrapper, kwargs):
    """Dropout trains with a mask per seed and evaluates without; a layer vmap refuses to
    evaluate with shared inputs is evaluated batched."""
    runs = dora_runs(nb, wrapper(nb), helpers.make_mlp(SIZES, seed=0), layer_kwargs=kwargs)
    task = tiny_task()
    for k, model in enumerate(runs.models):
        assert model.training
        accuracy = helpers.accuracy(model, task.test_x, task.test_y)
        assert runs.test_acc[k, -1] == pytest.approx(accuracy, abs=1e-9)
