"""helpers.train and finetune: seeds trained at once equal the same seeds trained one at a time
(the reference is the plainest loop: one model, one Adam, one batch at a time); seed k pairs
configurations; what is logged and evaluated."""

import copy

import numpy as np
import pytest
import torch

import helpers
from dora_tutorial.runtime import seed_everything
from support import small_cnn, solo_run, tiny_task, wrappers

SIZES = (784, 32, 16, 10)
SOLO = [("mlp", w) for w in (None, "LinearWithLoRA", "LinearWithDoRA", "DoRALinear")]
SOLO += [("cnn", w) for w in (None, "LoRA", "DoRA")]  # convolution adapters under vmap too


@pytest.mark.slow
@pytest.mark.parametrize("model, wrapper", SOLO, ids=lambda v: str(v))
def test_each_batched_seed_equals_its_solo_run(nb, model, wrapper):
    """Every trainable parameter of seed k (DoRA's m included) moves, as in a run alone."""
    cnn = model == "cnn"
    pretrained = small_cnn(torch.float32) if cnn else helpers.make_mlp(SIZES, seed=0)
    wrapper = wrapper and (wrappers(nb, wrapper) if cnn else getattr(nb, wrapper))
    task, seeds = tiny_task(n=128 if cnn else 256), (0, 1)
    kw = dict(epochs=2, lr=3e-3, batch_size=32, log=None)
    runs = helpers.finetune(pretrained, task, seeds=seeds, wrapper=wrapper, **kw)
    for k, seed in enumerate(seeds):
        seed_everything(seed)  # what finetune builds for one seed, written out
        if wrapper is None:
            start = copy.deepcopy(pretrained).requires_grad_(True)
        else:
            start = helpers.add_adapters(pretrained, wrapper, 4, 8)
        solo = solo_run(copy.deepcopy(start), task, seed, 2, 3e-3, 32)
        for name, p in solo.named_parameters():
            q = runs.models[k].get_parameter(name)
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=f"seed {seed}: {name}")
            assert not p.requires_grad or not torch.equal(p, start.get_parameter(name)), name
        accuracy = helpers.accuracy(solo, task.test_x, task.test_y)
        assert runs.test_acc[k, -1] == pytest.approx(accuracy, abs=1 / len(task.test_x))
    assert not torch.equal(runs.models[0].get_parameter(name), runs.models[1].get_parameter(name))


def test_seed_k_gives_every_configuration_the_same_start(nb):
    """Seed k's A is the same for LoRA and both DoRAs (lr 0 keeps it); its batches depend on
    the seed alone (above): configurations run with the same seeds are paired."""
    kw = dict(seeds=(3, 7), epochs=1, lr=0.0, batch_size=64, log=None)
    pretrained, task = helpers.make_mlp(SIZES, seed=0), tiny_task()
    lora, dora, efficient = (
        [
            m.get_parameter("0.lora.A")
            for m in helpers.finetune(pretrained, task, wrapper=w, **kw).models
        ]
        for w in (nb.LinearWithLoRA, nb.LinearWithDoRA, nb.DoRALinear)
    )
    assert torch.equal(torch.stack(lora), torch.stack(dora))
    assert torch.equal(torch.stack(lora), torch.stack(efficient)) and not torch.equal(*lora)


def test_train_learns_logs_each_epoch_and_scores_the_set_asked_for():
    task, lines = tiny_task(), []
    task.val_x, task.val_y = task.train_x[64:128], (task.train_y[64:128] + 1) % 10  # wrong labels
    model = helpers.make_mlp(SIZES, seed=0)
    runs = helpers.train(model, task, epochs=3, lr=3e-3, batch_size=32, log=lines.append)
    assert runs.train_loss.shape == runs.test_acc.shape == (1, 3) and runs.models == [model]
    assert runs.train_loss[0, -1] < 0.5 * runs.train_loss[0, 0] and runs.final[0] > 90
    assert runs.test_acc[0, -1] == helpers.accuracy(model, task.test_x, task.test_y, batch_size=7)
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3: train loss")
    runs = helpers.train(model, task, epochs=1, lr=3e-3, batch_size=32, evaluate_on="val", log=None)
    assert runs.final[0] < 20  # trained on the right labels, scored on wrong ones


def test_train_refuses_what_it_cannot_train_together(nb):
    kw = dict(task=tiny_task(), epochs=1, lr=1e-3, batch_size=32, log=None)
    with pytest.raises(ValueError, match="no trainable"):
        helpers.train(helpers.make_mlp(SIZES).requires_grad_(False), **kw)
    with pytest.raises(ValueError, match="2 models need 2 seeds"):
        helpers.train([helpers.make_mlp(SIZES)] * 2, **kw)
    models = [helpers.make_mlp(SIZES, seed=s) for s in (0, 1)]
    with pytest.raises(ValueError, match="share their frozen weights"):
        helpers.train(
            [helpers.add_adapters(m, nb.LinearWithLoRA, 2, 4) for m in models], seeds=(0, 1), **kw
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


@pytest.mark.parametrize("wrapper", ["LoRALinear", "DoRALinear", "in place"])
def test_evaluation_is_each_models_own_accuracy_in_eval_mode(nb, wrapper):
    """Dropout trains with a mask per seed and evaluates without; a layer vmap refuses to
    evaluate with shared inputs (it adds a seed's update in place to x W0^T) is run batched."""

    class InPlace(nb.LinearWithLoRA):
        def forward(self, x):
            h = self.linear(x)
            h += self.lora(x)
            return h

    kwargs = {} if wrapper == "in place" else {"dropout": 0.5}
    task, pretrained = tiny_task(), helpers.make_mlp(SIZES, seed=0)
    kw = dict(seeds=(0, 1), epochs=1, lr=3e-3, batch_size=32, log=None, layer_kwargs=kwargs)
    layer = InPlace if wrapper == "in place" else getattr(nb, wrapper)
    runs = helpers.finetune(pretrained, task, wrapper=layer, **kw)
    for k, model in enumerate(runs.models):
        assert model.training
        accuracy = helpers.accuracy(model, task.test_x, task.test_y)
        assert runs.test_acc[k, -1] == pytest.approx(accuracy, abs=1e-9)
