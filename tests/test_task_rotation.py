"""helpers.make_task rotates every split by the requested angle: the fine-tuning task is the
rotated one, not the pretraining task again (a make_task that ignored ``degrees`` would fine-tune
on the data the model was pretrained on, and every method would look the same).

Synthetic images only; each training and test image's label is its index, so a task's labels say
which image each of its rows came from, whatever the subsampling picked."""

import pytest
import torch

import helpers


def images(n, seed):
    """n uint8 images (n, 28, 28) of random strokes on black, and labels 0..n-1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 28, 28)
    for k in range(n):
        r, c = torch.randint(3, 20, (2,), generator=g).tolist()
        x[k, r : r + 6, c : c + 3] = 1.0  # an off-centre bar: rotating it changes the image
    x = (x * 200 + torch.randint(0, 40, x.shape, generator=g)).clamp(0, 255)
    return x.to(torch.uint8), torch.arange(n)


def task(degrees, **kw):
    train, train_labels = images(40, seed=0)
    test, test_labels = images(12, seed=1)
    return (
        train,
        test,
        helpers.make_task(train, train_labels, test, test_labels, degrees=degrees, **kw),
    )


@pytest.mark.parametrize("degrees", [45, -30])
@pytest.mark.parametrize("subsample", [{}, {"n_train": 25, "n_val": 10, "seed": 3}])
def test_every_split_is_rotated_by_the_requested_angle(degrees, subsample):
    train, test, rotated = task(degrees, **subsample)
    _, _, upright = task(0, **subsample)
    splits = [
        (rotated.train_x, rotated.train_y, upright.train_x, train),
        (rotated.test_x, rotated.test_y, upright.test_x, test),
    ]
    if subsample:
        assert len(rotated.val_y) == 10
        splits.append((rotated.val_x, rotated.val_y, upright.val_x, train))
    for x, y, x_upright, source in splits:
        expected = helpers.to_inputs(helpers.rotate(source[y], degrees))  # rotate, then convert
        assert torch.equal(x, expected)
        assert (x - x_upright).abs().mean() > 0.1  # not the task at angle 0


def test_a_quarter_turn_is_torch_rot90():
    """Independent of helpers.rotate: 90 degrees counter-clockwise moves pixel (r, c) to
    (27 - c, r), which is what torch.rot90 does over (rows, columns)."""
    train, test, rotated = task(90)
    turned = helpers.make_task(
        torch.rot90(train, 1, dims=(1, 2)),
        torch.arange(40),
        torch.rot90(test, 1, dims=(1, 2)),
        torch.arange(12),
    )
    assert torch.equal(rotated.train_x, turned.train_x)
    assert torch.equal(rotated.test_x, turned.test_x)
    assert not torch.equal(
        rotated.test_x, helpers.make_task(train, torch.arange(40), test, torch.arange(12)).test_x
    )


def centroids(inputs):
    """Each image's centre of mass as (x, y) about the image centre (y up), read back from
    normalised inputs (N, 784)."""
    pixels = (inputs * helpers.MNIST_STD + helpers.MNIST_MEAN).reshape(-1, 28, 28)
    pixels = torch.where(pixels > 0.5, pixels, 0.0)  # the bar, not the background noise
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = pixels.sum((1, 2))
    x = (pixels * (cols - 13.5)).sum((1, 2)) / mass
    y = (pixels * (13.5 - rows)).sum((1, 2)) / mass  # rows grow downwards
    return x, y


@pytest.mark.parametrize("degrees", [30, 45, -60])
def test_the_images_turn_by_the_angle_asked_for(degrees):
    """Each test image's centre of mass turns about the centre by ``degrees`` (bilinear
    rounding blurs the bar a little: within 3 degrees), and keeps its distance from it."""
    _, _, rotated = task(degrees)
    _, _, upright = task(0)
    (x0, y0), (x1, y1) = centroids(upright.test_x), centroids(rotated.test_x)
    off_centre = torch.hypot(x0, y0) > 3  # a bar near the centre has no angle to speak of
    assert off_centre.sum() >= 8
    turned = torch.rad2deg(torch.atan2(y1, x1) - torch.atan2(y0, x0))[off_centre]
    turned = (turned + 180) % 360 - 180  # into [-180, 180)
    assert (turned - degrees).abs().max() < 3, turned
    torch.testing.assert_close(torch.hypot(x1, y1), torch.hypot(x0, y0), atol=0.5, rtol=0)
