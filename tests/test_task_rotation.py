"""helpers.make_task: every split rotated by the angle asked for (ignoring it, fine-tuning would
see the pretraining data again), subsets drawn by seed, a validation set disjoint from them, on
synthetic images whose label is their index: a task's labels say which image each row came from."""

import pytest
import torch

import helpers


def images(n, seed):
    """n uint8 images, each an off-centre bar on noise (rotating it changes the image)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 28, 28)
    for k in range(n):
        r, c = torch.randint(3, 20, (2,), generator=g).tolist()
        x[k, r : r + 6, c : c + 3] = 1.0
    return (x * 200 + torch.randint(0, 40, x.shape, generator=g)).to(torch.uint8), torch.arange(n)


TRAIN, TEST = images(40, seed=0), images(12, seed=1)


def task(degrees=0, train=TRAIN, test=TEST, **kw):
    return helpers.make_task(*train, *test, degrees=degrees, **kw)


@pytest.mark.parametrize("degrees", [45, -30])
@pytest.mark.parametrize("subsample", [{}, {"n_train": 25, "n_val": 10, "seed": 3}])
def test_every_split_is_rotated_by_the_requested_angle(degrees, subsample):
    rotated, upright = task(degrees, **subsample), task(0, **subsample)
    splits = [("train", TRAIN[0]), ("test", TEST[0])] + [("val", TRAIN[0])] * bool(subsample)
    for split, source in splits:
        x, y = getattr(rotated, f"{split}_x"), getattr(rotated, f"{split}_y")
        assert torch.equal(x, helpers.to_inputs(helpers.rotate(source[y], degrees)))
        assert (x - getattr(upright, f"{split}_x")).abs().mean() > 0.1  # not the upright task


def test_a_quarter_turn_is_torch_rot90_on_normalised_rows():
    """Independent of helpers.rotate and to_inputs: 90 degrees counter-clockwise is rot90."""
    rotated = task(90)
    for x, (images, _) in ((rotated.train_x, TRAIN), (rotated.test_x, TEST)):
        expected = (torch.rot90(images, 1, dims=(1, 2)) / 255 - 0.1307) / 0.3081
        torch.testing.assert_close(x, expected.reshape(-1, 784))


def test_subsets_are_drawn_by_seed_and_the_validation_set_is_disjoint():
    a, b, c = task(n_train=20, seed=1), task(n_train=20, seed=1), task(n_train=20, seed=2)
    assert a.train_x.shape == (20, 784) and a.test_x.shape == (12, 784) and len(a.val_y) == 0
    assert torch.equal(a.train_y, b.train_y) and not torch.equal(a.train_y, c.train_y)
    split = task(n_train=20, n_val=10, seed=1)
    assert torch.equal(split.train_x, a.train_x)  # asking for validation changes nothing
    assert len(split.val_y) == 10 and set(split.val_y.tolist()).isdisjoint(split.train_y.tolist())
    with pytest.raises(ValueError, match="n_train"):
        task(n_train=35, n_val=10)
