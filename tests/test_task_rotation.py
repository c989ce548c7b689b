"""helpers.make_task: every split rotated by the angle asked for (a make_task that ignored it
would fine-tune on the pretraining data again, and every method would look the same), subsets
drawn by seed, a validation set disjoint from them. Synthetic images whose label is their index,
so a task's labels say which image each row came from."""

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


def test_a_quarter_turn_is_torch_rot90():
    """Independent of helpers.rotate: 90 degrees counter-clockwise is torch.rot90."""
    turned = [(torch.rot90(x, 1, dims=(1, 2)), y) for x, y in (TRAIN, TEST)]
    rotated, expected = task(90), task(0, *turned)
    assert torch.equal(rotated.train_x, expected.train_x)
    assert torch.equal(rotated.test_x, expected.test_x)


def centroids(inputs):
    """Each image's centre of mass (x, y) about the image centre, y up, from its inputs."""
    pixels = (inputs * helpers.MNIST_STD + helpers.MNIST_MEAN).reshape(-1, 28, 28)
    pixels = torch.where(pixels > 0.5, pixels, 0.0)  # the bar, not the noise
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = pixels.sum((1, 2))
    return (pixels * (cols - 13.5)).sum((1, 2)) / mass, (pixels * (13.5 - rows)).sum((1, 2)) / mass


@pytest.mark.parametrize("degrees", [30, -60])
def test_the_images_turn_by_the_angle_asked_for(degrees):
    """Each bar's centre of mass turns by ``degrees`` (within 3: bilinear blur) at its distance."""
    (x0, y0), (x1, y1) = centroids(task(0).test_x), centroids(task(degrees).test_x)
    off_centre = torch.hypot(x0, y0) > 3  # a bar at the centre has no angle
    turned = torch.rad2deg(torch.atan2(y1, x1) - torch.atan2(y0, x0))[off_centre]
    assert off_centre.sum() >= 8 and ((turned + 180) % 360 - 180 - degrees).abs().max() < 3
    torch.testing.assert_close(torch.hypot(x1, y1), torch.hypot(x0, y0), atol=0.5, rtol=0)


def test_subsets_are_drawn_by_seed_and_the_validation_set_is_disjoint():
    a, b, c = task(n_train=20, seed=1), task(n_train=20, seed=1), task(n_train=20, seed=2)
    assert a.train_x.shape == (20, 784) and a.test_x.shape == (12, 784) and len(a.val_y) == 0
    assert torch.equal(a.train_y, b.train_y) and not torch.equal(a.train_y, c.train_y)
    split = task(n_train=20, n_val=10, seed=1)
    assert torch.equal(split.train_x, a.train_x)  # asking for validation changes nothing
    assert len(split.val_y) == 10 and set(split.val_y.tolist()).isdisjoint(split.train_y.tolist())
    with pytest.raises(ValueError, match="n_train"):
        task(n_train=35, n_val=10)


def test_inputs_are_normalised_rows_and_full_turns_are_exact():
    x = helpers.to_inputs(torch.full((3, 28, 28), 255, dtype=torch.uint8))
    assert x.shape == (3, 784) and torch.allclose(x, torch.full_like(x, (1 - 0.1307) / 0.3081))
    assert torch.equal(helpers.rotate(helpers.rotate(TRAIN[0], 90), -90), TRAIN[0])
