"""MNIST as tensors and the rotated-digits task built from it (the files: ``mnist_files``)."""

from dataclasses import dataclass

import torch

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of pixel / 255 over the training set


def to_inputs(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images (N, 28, 28) -> normalised float32 rows (N, 784): (x/255 - mean) / std."""
    x = images.to(device=device, dtype=torch.float32).div_(255.0)
    return x.sub_(MNIST_MEAN).div_(MNIST_STD).reshape(len(images), 28 * 28)


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate uint8 images (N, 28, 28) by ``degrees`` counter-clockwise (bilinear, exact)."""
    from torchvision.transforms.functional import InterpolationMode
    from torchvision.transforms.functional import rotate as tv_rotate

    if len(images) == 0:  # nothing to turn (e.g. no validation set)
        return images.clone()
    out = tv_rotate(images.unsqueeze(1).float(), degrees, InterpolationMode.BILINEAR)
    return out.round_().clamp_(0, 255).to(torch.uint8).squeeze(1)


@dataclass
class Task:
    """Inputs (N, 784) float32 and labels (N,) int64 on one device; ``val_*`` may be empty."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None


def make_task(
    train_images,
    train_labels,
    test_images,
    test_labels,
    device="cpu",
    degrees=0.0,
    n_train=None,
    n_val=0,
    seed=0,
) -> Task:
    """A classification task on ``device``, rotated by ``degrees`` and subsampled.

    One permutation (``seed``) gives ``n_train`` training examples and the next ``n_val`` as a
    validation set, so asking for one does not change the training examples; the whole test set
    is kept, rotated the same way."""
    n, shuffle = len(train_images), n_train is not None or n_val
    n_train = n - n_val if n_train is None else n_train
    if n_train < 1 or n_val < 0 or n_train + n_val > n:
        raise ValueError(f"n_train + n_val must be in 1..{n}, got {n_train} + {n_val}")
    if shuffle:
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        train, val = pick[:n_train], pick[n_train : n_train + n_val]
    else:  # the whole set in order: views, not a copy through an index
        train, val = slice(0, n), slice(n, n)
    splits = [(train_images[train], train_labels[train]), (test_images, test_labels)]
    splits += [(train_images[val], train_labels[val])]
    if degrees:
        splits = [(rotate(images, degrees), labels) for images, labels in splits]
    return Task(*(t for x, y in splits for t in (to_inputs(x, device), y.to(device))))
