"""Plumbing for DoRA.ipynb, in the order the notebook uses it.

The notebook builds the LoRA and DoRA layers; this file holds what the story should not be
cluttered by. Each section names the notebook sections it serves:

    setup ............................ Setup
    models and adapters .............. 4, 18
    data ............................. 5, 6    (downloading MNIST: dora_tutorial/mnist_files.py)
    training, many seeds at once ..... 6, 9, 11
    evidence ......................... 6, 7, 9, 11, 12
    how fine-tuning moves weights .... 10
    shipping ......................... 14, 15, 16, 17, 18
    plots ............................ all (1: the idea)

Part I is sections 1-7, Part II 8-12, Part III 13-18.

Self-contained instruments live in the package dora_tutorial/, one module each, and what the
notebook uses from them is imported below: downloading MNIST (mnist_files), adapter files and
PEFT's names (adapter_files), bytes kept for backward (memory, sections 11 and 13), the
conformance check (check_dora, section 17). Maintainers' scripts (tools/) are never imported here.

Helpers never define adapter layers: they take the notebook's layer classes as arguments.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import random
import statistics
import textwrap
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dora_tutorial.adapter_files import (  # adapter files, ours and PEFT's: 9, 10, 13
    adapter_layers,
    load_adapter,
    load_peft_adapter,
    save_adapter,
    save_peft_adapter,
)
from dora_tutorial.adapter_files import inside as _inside
from dora_tutorial.check_dora import check_dora  # any DoRA layer against the paper: 12
from dora_tutorial.files import write_json as _write_json
from dora_tutorial.memory import saved_tensor_bytes  # kept for backward: 2b, 8
from dora_tutorial.precision import magnitude_moves, merge_error  # low precision: 14

# The notebook's interface, by the notebook's sections: every name here is called there, and
# nothing else is (tests/test_layout.py checks both ways). Other public names are the building
# blocks these use, tested on their own and used by scripts (Runs, Task, Comparison, timed, ...);
# underscore names are internal.
__all__ = [
    # Setup
    "require_version",
    "pick_device",
    "wrap",
    # models and adapters (3, 13)
    "make_mlp",
    "add_adapters",
    "parameter_counts",
    "layer_weights",
    "adapter_layers",
    "saved_tensor_bytes",
    # data (4, 5)
    "load_mnist",
    "rotate",
    "make_task",
    # training (4, 5, 6, 8)
    "train",
    "finetune",
    "accuracy",
    # evidence (5, 6, 7, 8, 11)
    "compare",
    "lora_at_budget",
    "Comparison",
    "what_we_learned",
    "holm",
    "in_words",
    "results_table",
    "run_summary",
    "summary_text",
    "write_results",
    # how fine-tuning moves the weights (10)
    "figure2_points",
    "figure2_analysis",
    "figure2_table",
    # shipping (9, 10, 12, 13)
    "merge_adapters",
    "magnitude_moves",
    "merge_error",
    "inference_ms",
    "save_adapter",
    "load_adapter",
    "save_peft_adapter",
    "load_peft_adapter",
    "check_dora",
    "optional_part",
    # plots
    "plot_idea",
    "plot_digits",
    "plot_methods",
    "plot_paired",
    "plot_rank_sweep",
    "plot_figure2",
]

__version__ = "0.2.0"  # the release this file belongs to; DoRA.ipynb asks for the same one

REPO = Path(__file__).resolve().parent
WIDTH = 96  # printed sentences are wrapped to fit a notebook's output area


# ---- Setup (notebook: Setup) -----------------------------------------------------------------


def require_version(release: str) -> None:
    """Stop with a clear message unless this helpers.py is from ``release`` (e.g. "v0.2.0").

    The notebook calls this right after ``import helpers``: a notebook from one release next to
    a helpers.py from another (on Colab, say) would otherwise fail later, far from the cause."""
    if release.removeprefix("v") != __version__:
        raise ImportError(
            f"helpers.py is version {__version__} ({__file__}) but this notebook needs "
            f"{release}: put the helpers.py of release {release} next to the notebook (on "
            "Colab: delete the folder 'project' and re-run the first cell)"
        )


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA if present, else Apple MPS if it really works, else CPU.

    ``prefer`` (or the environment variable ``DORA_DEVICE``) forces a choice, e.g. "cpu".
    """
    choice = prefer or os.environ.get("DORA_DEVICE")
    if choice:
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_works():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_works() -> bool:
    """MPS can be 'available' and still fail on first use; try one tiny op."""
    try:
        if not torch.backends.mps.is_available():
            return False
        return bool((torch.ones(2, device="mps") * 2).sum().item() == 4)
    except Exception:
        return False


def sync(device: torch.device | str) -> None:
    """Wait until ``device`` has finished its queued work (CUDA and MPS run asynchronously), so
    that a clock read afterwards measures work done, not work queued. The one sync every timer
    here and in ``benchmarks/`` uses."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device: torch.device | str) -> tuple[float, object]:
    """(seconds, result) of ``fn()``, with ``device`` synchronised before both clock reads."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def wrap(text: str, indent: str = "") -> str:
    """``text`` wrapped to ``WIDTH`` columns; continuation lines indented by ``indent``."""
    return textwrap.fill(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False)


# ---- Models and adapters: the MLP, wrapping layers, counting (notebook: 4, 18) ---------------


def make_mlp(sizes: tuple[int, ...], seed: int = 0) -> nn.Sequential:
    """Linear-ReLU-...-Linear, seeded; inputs are images flattened to rows of 784 pixels."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def add_adapters(model: nn.Module, wrapper, rank: int, alpha: float, **kwargs) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` wrapped and only the adapters trainable.

    ``wrapper`` is a layer class from the notebook, called as ``wrapper(linear, rank, alpha,
    **kwargs)``, or a dict of them by layer type: ``{nn.Linear: LinearWithDoRA, nn.Conv2d:
    Conv2dWithDoRA}`` wraps both types. All parameters of the copy are frozen first, so
    the only trainable parameters are the ones the wrappers create (A, B and, for DoRA, m).
    A layer cannot hold more than full rank: a layer with fewer than ``rank`` inputs or outputs
    gets rank ``min(in_features, out_features)`` (e.g. a 10-class head at rank 16 gets 10; a
    kernel counts in_channels / groups * kh * kw inputs).
    """
    wrappers = wrapper if isinstance(wrapper, dict) else {nn.Linear: wrapper}
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    targets = [(n, mod) for n, mod in model.named_modules() if isinstance(mod, tuple(wrappers))]
    if not targets:
        names = " or ".join(f"nn.{kind.__name__}" for kind in wrappers)
        raise ValueError(f"the model has no {names} layers to wrap")
    for name, layer in targets:
        r = min(rank, *layer.weight.flatten(1).shape)  # (out, in), or (out, in/groups*kh*kw)
        make = next(w for kind, w in wrappers.items() if isinstance(layer, kind))
        model = _replace(model, name, make(layer, r, alpha, **kwargs))
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The effective weight of every linear or conv layer, keyed by module name (detached copies).

    Adapter layers report ``merged_weight()`` (W0 + sBA for LoRA, m V/||V|| for DoRA); plain
    ``nn.Linear`` and ``nn.Conv2d`` layers their weight. A layer inside an adapter is not reported.
    """
    adapters = adapter_layers(model)
    weights = {}
    for name, module in model.named_modules():
        if name in adapters:
            weights[name] = module.merged_weight().detach().clone()
        elif isinstance(module, nn.Linear | nn.Conv2d) and not _inside(name, adapters):
            weights[name] = module.weight.detach().clone()
    return weights


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """model.<name> = module (dotted names); returns the new root if name is ""."""
    if name == "":
        return module
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
    return model


# ---- Data: MNIST as tensors, the rotated-digits task (notebook: 5, 6) ------------------------

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of pixel / 255 over the training set


def load_mnist(root: str | Path = REPO / "data", *, allow_download: bool = True, verbose=True):
    """MNIST as (train_images, train_labels, test_images, test_labels) tensors.

    Images are uint8 (N, 28, 28), labels int64 (N,). Verified files in ROOT/MNIST/raw are used
    as they are; otherwise they are fetched and checked against the official SHA-256
    (``dora_tutorial/mnist_files.py`` says how). ``allow_download=False`` never touches the network.
    """
    from dora_tutorial.mnist_files import (
        load_mnist as fetch,  # the download machinery, out of the way
    )

    return fetch(root, allow_download=allow_download, verbose=verbose)


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
    """A classification task as tensors on ``device``, optionally rotated and subsampled.

    One random permutation of the training images (``seed``) gives ``n_train`` training
    examples and the next ``n_val`` as a validation set, disjoint from them and from the test
    set (the whole test set is kept, rotated the same way). Asking for a validation set does
    not change which examples are used for training.
    """
    if n_train is not None or n_val:
        n_train = len(train_images) - n_val if n_train is None else n_train
        if n_train < 1 or n_val < 0 or n_train + n_val > len(train_images):
            raise ValueError(
                f"n_train + n_val must be in 1..{len(train_images)}, got {n_train} + {n_val}"
            )
        pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))
        val = pick[n_train : n_train + n_val]
        val_images, val_labels = train_images[val], train_labels[val]
        train_images, train_labels = train_images[pick[:n_train]], train_labels[pick[:n_train]]
    else:
        val_images, val_labels = train_images[:0], train_labels[:0]
    if degrees:
        train_images, val_images, test_images = (
            rotate(images, degrees) for images in (train_images, val_images, test_images)
        )
    return Task(
        to_inputs(train_images, device),
        train_labels.to(device),
        to_inputs(test_images, device),
        test_labels.to(device),
        to_inputs(val_images, device),
        val_labels.to(device),
    )


# ---- Training: one loop for one model or many seeds at once (notebook: 6, 9, 11) -----------


@dataclass
class Runs:
    """One configuration trained with one or more seeds, everything in seed order.

    ``test_acc`` and ``train_loss`` are (seeds, epochs) arrays; ``seconds`` the time of each
    epoch for all seeds together; ``weights[k][e]`` the effective weight of every linear layer
    of seed k after epoch e+1 (when recorded); ``models[k]`` seed k's trained model."""

    seeds: tuple[int, ...]
    models: list[nn.Module]
    trainable: int
    train_loss: np.ndarray
    test_acc: np.ndarray
    seconds: list[float]
    weights: list[list[dict[str, torch.Tensor]]] = field(default_factory=list)

    @property
    def final(self) -> np.ndarray:
        """Final test accuracy of each seed, in percent."""
        return 100 * self.test_acc[:, -1]


def batch_orders(seeds, n: int):
    """For each epoch, an (S, n) tensor: row k is a random order of the n examples drawn from
    seed k's own generator, so seed k sees the same batches whatever else trains beside it."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    while True:
        yield torch.stack([torch.randperm(n, generator=g) for g in generators])


def train(
    models,
    task: Task,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seeds=(0,),
    evaluate_on: str = "test",
    curves: bool = True,
    record_weights: bool = False,
    log=print,
    name: str = "",
) -> Runs:
    """Adam on cross-entropy: one model, or several copies of one architecture at once.

    ``models`` is a module or a list of modules that differ only in their trainable
    parameters (seeds of one configuration); ``seeds[k]`` sets model k's batch order. All are
    moved to the task's device, trained in one batched computation (``torch.func.vmap`` over
    their stacked trainable parameters, one Adam over the stacks: Adam works element by
    element, so this is the algorithm of separate runs), and written back when done.
    After each epoch: mean training loss, and accuracy on ``task.<evaluate_on>_x`` (eval mode).
    ``curves=False`` evaluates after the last epoch only (the earlier epochs' accuracies are
    NaN): for runs whose learning curves are not drawn, it saves one evaluation per epoch and
    changes nothing else (evaluation draws no random numbers and trains nothing).
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    seeds = tuple(seeds)
    if len(seeds) != len(models):
        raise ValueError(f"{len(models)} models need {len(models)} seeds, got {len(seeds)}")
    device = task.train_x.device
    for model in models:
        model.to(device)
    stacked, shared = _stack_parameters(models)
    template = models[0]

    def logits(params, x):
        return torch.func.functional_call(template, {**params, **shared}, (x,))

    def loss(params, x, y):
        return F.cross_entropy(logits(params, x), y)

    batched_loss = torch.func.vmap(loss, randomness="different")  # dropout: a mask per seed
    optimizer = make_adam(list(stacked.values()), lr)
    eval_x, eval_y = getattr(task, f"{evaluate_on}_x"), getattr(task, f"{evaluate_on}_y")
    n, orders = len(task.train_x), batch_orders(seeds, len(task.train_x))
    losses, accuracies, seconds, weights = [], [], [], [[] for _ in models]
    template.train()
    for epoch in range(1, epochs + 1):
        start, total = time.perf_counter(), torch.zeros(len(models), device=device)
        order = next(orders).to(device)
        for i in range(0, n, batch_size):
            idx = order[:, i : i + batch_size]  # (S, batch): each seed its own batch
            batch_x, batch_y = _gather(task.train_x, idx), _gather(task.train_y, idx)
            batch_losses = batched_loss(stacked, batch_x, batch_y)
            optimizer.zero_grad(set_to_none=True)
            batch_losses.sum().backward()  # seeds share no parameter: each gets its own grad
            optimizer.step()
            total += batch_losses.detach() * idx.shape[1]  # stays on the device: no sync
        sync(device)
        seconds.append(time.perf_counter() - start)
        losses.append((total / n).cpu().numpy())
        if curves or epoch == epochs:
            template.eval()  # evaluated without dropout
            accuracies.append(_accuracies(logits, stacked, eval_x, eval_y))
            template.train()
        else:
            accuracies.append(np.full(len(models), np.nan, dtype=np.float32))  # as measured ones
        if record_weights or epoch == epochs:
            _write_back(stacked, models)  # the models hold the trained values from here on
        if record_weights:
            for k, model in enumerate(models):
                weights[k].append(layer_weights(model))
        if log is not None:
            acc = 100 * accuracies[-1]
            spread = f" ± {acc.std(ddof=1):.2f}" if len(acc) > 1 else ""
            measured = f"{acc.mean():.2f}{spread} %" if not np.isnan(acc).all() else "not measured"
            log(
                f"{name}epoch {epoch}/{epochs}: train loss {losses[-1].mean():.4f}, {evaluate_on} "
                f"accuracy {measured} ({seconds[-1]:.2f} s)"
            )
    trainable = sum(t[0].numel() for t in stacked.values())
    history = np.stack(losses, 1), np.stack(accuracies, 1), seconds
    return Runs(seeds, models, trainable, *history, weights if record_weights else [])


def _gather(data: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``data[idx]`` for an (S, batch) index: the same rows, copied by ``index_select`` (whole
    rows at a time; ``data[idx]`` costs about 4x as much for the notebook's batches on a CPU)."""
    return data.index_select(0, idx.reshape(-1)).view(*idx.shape, *data.shape[1:])


def _stack_parameters(models):
    """({name: (S, ...) leaf tensor} of the trainable parameters, {name: tensor} of the rest).

    The frozen parameters and buffers must be the same in every model: they are shared."""
    template = models[0]
    names = [n for n, p in template.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("the model has no trainable parameters")
    shared = {
        n: t.detach()
        for n, t in [*template.named_parameters(), *template.named_buffers()]
        if n not in names
    }
    for model in models[1:]:
        state = dict([*model.named_parameters(), *model.named_buffers()])
        if any(not torch.equal(state[n], t) for n, t in shared.items()):
            raise ValueError("models trained together must share their frozen weights")
    stacked = {
        n: torch.stack([m.get_parameter(n).detach() for m in models]).requires_grad_()
        for n in names
    }
    return stacked, shared


@torch.no_grad()
def _write_back(stacked: dict, models: list) -> None:
    for k, model in enumerate(models):
        for name, values in stacked.items():
            model.get_parameter(name).copy_(values[k])


@torch.no_grad()
def _accuracies(logits, stacked, x, y, chunk: int = 2048) -> np.ndarray:
    """Accuracy of every model on (x, y), evaluated in chunks, as a (S,) numpy array.

    Every model gets the same inputs: unbatched (``in_dims=None``), so that what does not
    depend on the trained parameters (the first layer's frozen ``x W0^T``) is computed once for
    all models. A layer that updates such an activation in place with a batched one is refused
    by vmap; then every model gets the inputs as a batched view (``expand``) instead."""
    count = len(next(iter(stacked.values())))
    shared = torch.func.vmap(logits, in_dims=(0, None))
    each = torch.func.vmap(logits)
    correct, unbatched = 0, True
    for i in range(0, len(x), chunk):
        inputs = x[i : i + chunk]
        if unbatched:
            try:
                out = shared(stacked, inputs)
            except RuntimeError:
                if i:  # the first chunk ran unbatched: a real error
                    raise
                unbatched = False  # a real error is raised again by the batched call
        if not unbatched:
            out = each(stacked, inputs.expand(count, *inputs.shape))
        correct = correct + (out.argmax(-1) == y[i : i + chunk]).sum(1)
    return (correct / max(len(x), 1)).cpu().numpy()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> float:
    """Fraction of rows of ``x`` whose arg-max logit equals ``y`` (model in eval mode, moved to
    ``x``'s device)."""
    was_training = model.training
    model.to(x.device).eval()
    correct = sum(
        (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    model.train(was_training)
    return correct / len(x)


def adamw(model: nn.Module, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with DoRA's magnitudes and the biases left out of
    the weight decay: decoupled decay pulls a parameter toward 0, and on m that shrinks each
    row's length instead of leaving it where the data put it (PEFT's ``lora_magnitude_vector``
    is found by its name too)."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            last = name.split(".")[-1]
            exempt = last in ("m", "bias") or "lora_magnitude_vector" in name
            (keep if exempt else decay).append(p)
    groups = [{"params": decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam, with the fused kernel (one update op for all tensors) where torch and the device
    have it: about 1.4x faster steps for a small MLP on a CPU. Same algorithm either way."""
    params = list(params)
    fused = all(_fused_adam_works(p.device, p.dtype) for p in params)
    return torch.optim.Adam(params, lr=lr, **({"fused": True} if fused else {}))


@functools.cache
def _fused_adam_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether fused Adam runs on this device and dtype. torch checks some of that when the
    optimizer is built and the rest at its first ``step()``, so try one step on a scratch tensor
    (older torch, a device or dtype without the kernel: fall back to plain Adam)."""
    try:
        p = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
        p.grad = torch.ones_like(p)
        torch.optim.Adam([p], lr=1e-3, fused=True).step()
        return True
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False


def finetune(pretrained, task, *, seeds, wrapper=None, rank=4, alpha=8, layer_kwargs=None, **kw):
    """Fine-tune copies of ``pretrained``, one per seed, all at once (see ``train``).

    ``wrapper=None`` trains every weight; otherwise ``add_adapters(pretrained, wrapper, ...)``.
    Seed k sets the adapter's random init (A) and the batch order, so two configurations run
    with the same seeds are paired: seed k of LoRA and of DoRA start from the same A and see
    the same batches. The pretrained model and the task do not depend on the seed.
    """
    models = []
    for seed in seeds:
        seed_everything(seed)
        if wrapper is None:
            models.append(copy.deepcopy(pretrained).requires_grad_(True))
        else:
            models.append(add_adapters(pretrained, wrapper, rank, alpha, **(layer_kwargs or {})))
    return train(models, task, seeds=seeds, **kw)


# ---- Evidence: paired tests, intervals, sentences (notebook: 6, 7, 9, 11, 12) -----------------

LEVEL = 0.95  # confidence level of every interval; tests are two-sided at 1 - LEVEL
POWER = 0.80  # for "the smallest difference these seeds could detect"


@dataclass(frozen=True)
class Comparison:
    """Mean final test accuracy of A minus B, in points, with its 95 % interval and p-value.

    Paired (a t-test on the per-seed differences) when A and B ran with the same seeds, else
    Welch's t-test. ``p_holm`` is set when the comparison is one of a family (Holm)."""

    a: str
    b: str
    diff: float
    low: float
    high: float
    p: float
    n: int
    test: str
    detectable: float
    p_holm: float | None = None
    family: int = 1
    se: float = 0.0  # standard error of ``diff``
    df: float = 1.0  # degrees of freedom of the t-test
    values: tuple = ((), ())  # the per-seed values of A and of B

    @property
    def family_interval(self) -> tuple[float, float]:
        """The interval at the family's level: 1 - 5 % / family (Bonferroni; = the 95 % CI for
        a single comparison). Inside a family this is what "ruled out" rests on."""
        from scipy import stats

        if self.family == 1:
            return self.low, self.high
        q = stats.t.ppf(1 - (1 - LEVEL) / self.family / 2, self.df)
        return self.diff - q * self.se, self.diff + q * self.se

    @property
    def verdict(self) -> str:
        """'ahead', 'behind' or 'no difference detected' (from the Holm p when there is one)."""
        p = self.p if self.p_holm is None else self.p_holm
        if not p < 1 - LEVEL:
            return "no difference detected"
        return "ahead" if self.diff > 0 else "behind"

    @property
    def verdict_interval(self) -> tuple[float, float]:
        """The interval at the level the verdict is decided at: it reaches zero exactly when
        the verdict's p (Holm-adjusted in a family) reaches 5 %. Alone: the 95 % CI. In a
        family, Holm tests this comparison at 5 % * p / p_holm (5 % / k for the k-th largest p,
        before Holm's running maximum); the interval at 1 minus that level."""
        from scipy import stats

        if self.p_holm is None or not 0 < self.p < 1:
            return self.low, self.high
        alpha = (1 - LEVEL) * self.p / self.p_holm
        q = stats.t.ppf(1 - alpha / 2, self.df)
        return self.diff - q * self.se, self.diff + q * self.se

    def near_threshold(self, margin: float) -> bool:
        """Whether ``verdict_interval`` touches zero, the threshold between the verdicts: its
        end nearest zero lies within ``margin`` times its half-width of zero, on either side.
        Such a verdict flips with a small change of the per-seed values (another seed set,
        another summation order)."""
        low, high = self.verdict_interval
        half = (high - low) / 2
        return half > 0 and abs(abs(self.diff) - half) <= margin * half

    @property
    def family_level(self) -> str:
        """The level of ``family_interval``: '95 %' alone, '99 %' in a family of five."""
        return f"{100 * (1 - (1 - LEVEL) / self.family):.0f} %"

    def sentence(self) -> str:
        """One sentence from the numbers: the difference, its interval, the test, the verdict;
        when no difference is detected, what the interval rules out (at the family's level)."""
        numbers = (
            f"95 % CI {self.low:+.2f} to {self.high:+.2f}; {self.test}, {self.n} seeds, "
            f"p {_p(self.p)}"
        )
        low, high = self.family_interval
        if self.p_holm is not None:
            numbers += (
                f", Holm-adjusted over {self.family} ranks p {_p(self.p_holm)}; "
                f"{self.family_level} CI over the {self.family} ranks "
                f"{low:+.2f} to {high:+.2f}"
            )
        if self.verdict == "no difference detected":
            return (
                f"{self.a} - {self.b} = {self.diff:+.2f} points ({numbers}): no difference "
                f"detected; {self.a} ahead by more than {max(high, 0):.2f} or behind by more "
                f"than {max(-low, 0):.2f} points is ruled out at {self.family_level}."
            )
        side = "ahead of" if self.verdict == "ahead" else "behind"
        return f"{self.a} is {side} {self.b} by {abs(self.diff):.2f} points ({numbers})."


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def compare(name_a: str, runs_a: Runs, name_b: str, runs_b: Runs) -> Comparison:
    """Compare the final test accuracies of two configurations (see ``Comparison``): paired
    when both ran with the same seeds, seed k against seed k."""
    paired = tuple(runs_a.seeds) == tuple(runs_b.seeds)
    return compare_values(name_a, runs_a.final, name_b, runs_b.final, paired=paired)


def compare_values(name_a: str, a, name_b: str, b, paired: bool = True) -> Comparison:
    """``compare`` on per-seed values (a paired t-test on a - b, or Welch's). The comparison
    keeps the values, so that runs on other seed sets can be pooled with it."""
    from scipy import stats  # on Colab; imported here so that importing helpers stays quick

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if min(len(a), len(b)) < 2:
        raise ValueError("a comparison needs at least 2 seeds per configuration")
    if paired:
        if len(a) != len(b):
            raise ValueError(f"a paired comparison needs as many a as b: {len(a)}, {len(b)}")
        d = a - b
        n, test, se, df = len(d), "paired t-test", d.std(ddof=1) / math.sqrt(len(d)), len(d) - 1
    else:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        n, test, se = min(len(a), len(b)), "Welch t-test", math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se else 1.0
    diff = float(a.mean() - b.mean())
    q = stats.t.ppf(0.5 + LEVEL / 2, df)
    if se > 0:
        p = float(2 * stats.t.sf(abs(diff) / se, df))
    else:  # every seed gave the same difference: no spread to test against
        p = 0.0 if diff else 1.0
    detectable = float((q + stats.t.ppf(POWER, df)) * se)
    return Comparison(
        name_a,
        name_b,
        diff,
        diff - q * se,
        diff + q * se,
        p,
        n,
        test,
        detectable,
        se=se,
        df=df,
        values=(tuple(map(float, a)), tuple(map(float, b))),
    )


def holm(comparisons: list[Comparison]) -> list[Comparison]:
    """The same comparisons with Holm's step-down adjusted p-values (family-wise error 5 %)."""
    m = len(comparisons)
    order = sorted(range(m), key=lambda i: comparisons[i].p)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * comparisons[i].p))
        adjusted[i] = running
    return [replace(c, p_holm=adjusted[i], family=m) for i, c in enumerate(comparisons)]


def lora_at_budget(lora: dict[int, Runs], dora: Runs) -> Runs:
    """LoRA's final accuracy at DoRA's trainable-parameter count, seed by seed, as a Runs that
    ``compare`` pairs with ``dora``: "DoRA against LoRA at equal budget", beside equal rank.

    ``lora`` is {rank: Runs} (at least two ranks). For each seed, LoRA's final accuracy is
    interpolated linearly in log(trainable parameters) between the two ranks whose counts
    bracket DoRA's (DoRA's magnitudes add one parameter per output row, so its count lies
    between two LoRA ranks); an exact count takes that rank's accuracy. Every LoRA run must
    have DoRA's seeds, in the same order, so seed k stays paired with seed k. Only ``final``
    (and ``seeds``, ``trainable``) of the result mean anything: it has no models or history.
    """
    if len(lora) < 2:
        raise ValueError(f"interpolating needs LoRA at two ranks or more, got {list(lora)}")
    for rank, runs in lora.items():
        if tuple(runs.seeds) != tuple(dora.seeds):
            raise ValueError(
                f"LoRA at rank {rank} ran seeds {tuple(runs.seeds)}, DoRA {tuple(dora.seeds)}: "
                "a paired comparison needs the same seeds in the same order"
            )
    ranks = sorted(lora, key=lambda r: lora[r].trainable)
    counts = np.array([lora[r].trainable for r in ranks], dtype=float)
    if (np.diff(counts) <= 0).any():
        raise ValueError(f"two LoRA ranks have the same trainable count: {counts.tolist()}")
    target = dora.trainable
    if not counts[0] <= target <= counts[-1]:
        raise ValueError(
            f"DoRA's {target:,} trainable parameters lie outside LoRA's range "
            f"({counts[0]:,.0f} to {counts[-1]:,.0f} at ranks {ranks[0]} to {ranks[-1]}): "
            "add a LoRA rank on the other side, interpolation cannot extrapolate"
        )
    hi = int(np.searchsorted(counts, target))  # the first count >= target
    if counts[hi] == target:
        final = lora[ranks[hi]].final
    else:
        lo = hi - 1
        w = (math.log(target) - math.log(counts[lo])) / (
            math.log(counts[hi]) - math.log(counts[lo])
        )
        final = (1 - w) * lora[ranks[lo]].final + w * lora[ranks[hi]].final
    nothing = np.full((len(final), 1), np.nan)
    return Runs(tuple(dora.seeds), [], target, nothing, final[:, None] / 100, [])


def _mean_interval(values: np.ndarray) -> tuple[float, float]:
    """The 95 % confidence interval of the mean of ``values`` (t quantile, n - 1 degrees)."""
    from scipy import stats

    if len(values) < 2:
        raise ValueError("an interval needs at least 2 values")
    n, mean = len(values), values.mean()
    half = stats.t.ppf(0.5 + LEVEL / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return mean - half, mean + half


def what_we_learned(
    runs: dict[str, Runs], pretrained_accuracy: float, rank: int, rates: dict | None = None
) -> list[str]:
    """Part I's conclusions in five plain sentences, each computed from the run: where the
    methods land, DoRA against LoRA after the last epoch and before it (paired tests; the
    earlier epochs Holm-adjusted as one family), full FT against DoRA, and what DoRA costs and
    these runs cannot say. ``rates`` ({method: learning rate}): when the method ahead before
    the last epoch trains at the larger rate, the sentence says so."""
    ft, lora, dora = (runs[name] for name in ("full FT", "LoRA", "DoRA"))
    n = len(dora.seeds)
    vs_lora, vs_ft = compare("DoRA", dora, "LoRA", lora), compare("full FT", ft, "DoRA", dora)
    said = [
        f"On the rotated digits, where the pretrained network gets {100 * pretrained_accuracy:.1f}"
        f" %, full fine-tuning reaches {ft.final.mean():.1f} %, LoRA {lora.final.mean():.1f} % "
        f"and DoRA {dora.final.mean():.1f} % (means of {n} seeds)."
    ]
    if vs_lora.verdict == "no difference detected":
        said.append(
            f"After the last epoch, at rank {rank}, {n} paired seeds cannot tell DoRA from LoRA: "
            f"DoRA - LoRA = {vs_lora.diff:+.2f} points (95 % CI {vs_lora.low:+.2f} to "
            f"{vs_lora.high:+.2f}): differences beyond these bounds are ruled out, ones inside "
            "them are not."
        )
    else:
        said.append(
            f"At rank {rank} DoRA is {vs_lora.verdict} of LoRA by {abs(vs_lora.diff):.2f} points "
            f"(95 % CI {vs_lora.low:+.2f} to {vs_lora.high:+.2f}, paired over {n} seeds)."
        )
    if dora.test_acc.shape[1] > 1:
        said.append(_before_the_end(dora, lora, rates))
    gap = "ahead of" if vs_ft.verdict == "ahead" else "not ahead of"
    extra = dora.trainable - lora.trainable
    said.append(
        f"Full fine-tuning, which trains {ft.trainable / dora.trainable:.1f} times as many "
        f"numbers as DoRA, is {gap} it: {vs_ft.diff:+.2f} points (95 % CI {vs_ft.low:+.2f} to "
        f"{vs_ft.high:+.2f})."
    )
    said.append(
        f"DoRA's magnitudes add {extra:,} trainable numbers to LoRA's {lora.trainable:,} "
        f"({extra / lora.trainable:.0%}), one per output row; whether they buy more at a lower "
        "rank or at an equal budget, one rank cannot say: Part II measures it."
    )
    return said


def _before_the_end(dora: Runs, lora: Runs, rates: dict | None = None) -> str:
    """DoRA - LoRA after each epoch before the last, as one Holm family: the epochs where a
    difference is detected (with it), and those where none is; and, when the method ahead
    trains at the larger learning rate, that an early lead can be that rate's faster start."""
    earlier = range(dora.test_acc.shape[1] - 1)
    family = holm(
        [
            compare_values("DoRA", 100 * dora.test_acc[:, e], "LoRA", 100 * lora.test_acc[:, e])
            for e in earlier
        ]
    )
    groups = {}
    for e, c in enumerate(family, 1):
        groups.setdefault(_who(c), []).append((e, c))
    parts = []
    for who, members in groups.items():
        part = f"{who} after {in_words([e for e, _ in members], 'epoch')}"
        if who != "no difference detected":
            part += f" ({', '.join(f'{c.diff:+.2f}' for _, c in members)} points)"
            leader, other = ("DoRA", "LoRA") if who == "DoRA ahead" else ("LoRA", "DoRA")
            if rates is not None and rates[leader] > rates[other]:
                part += (
                    f", with {leader} at the larger learning rate ({rates[leader]:g} against "
                    f"{rates[other]:g}, each chosen on the validation set): possibly just a "
                    "faster start"
                )
        parts.append(part)
    over = "epoch 1" if len(earlier) == 1 else f"epochs 1-{len(earlier)}"
    return (
        f"Before the last epoch ({over}, paired, Holm-adjusted together): "
        f"{'; '.join(parts)}; the right panel of the fine-tuning figure shows every epoch."
    )


def _who(c: Comparison) -> str:
    """'DoRA ahead', 'DoRA behind' or 'no difference detected'."""
    return c.verdict if c.verdict == "no difference detected" else f"{c.a} {c.verdict}"


def in_words(numbers, noun: str) -> str:
    """[] -> 'no rank'; [4] -> 'rank 4'; [1, 16] -> 'ranks 1 and 16'; [2, 4, 8] -> 'ranks 2, 4
    and 8'."""
    numbers = [str(x) for x in numbers]
    if not numbers:
        return f"no {noun}"
    if len(numbers) == 1:
        return f"{noun} {numbers[0]}"
    return f"{noun}s {', '.join(numbers[:-1])} and {numbers[-1]}"


def _verdict_table(verdicts: dict[str, str]) -> str:
    """Conclusion | verdict, one row each (long verdicts wrap under their column)."""
    width = max(map(len, verdicts)) + 2
    rows = [f"{'conclusion':<{width}}verdict"]
    for key, verdict in verdicts.items():
        lines = textwrap.wrap(verdict, WIDTH - width) or [""]
        rows += [f"{key:<{width}}{lines[0]}"] + [" " * width + line for line in lines[1:]]
    return "\n".join(rows)


def _accuracy_rows(results: dict[str, Runs]) -> list[dict]:
    """Per method: trainable parameters, final test accuracy's mean, std and 95 % interval."""
    rows = []
    for name, runs in results.items():
        acc = runs.final
        low, high = _mean_interval(acc)
        rows.append(
            {
                "method": name,
                "trainable": runs.trainable,
                "mean": float(acc.mean()),
                "std": float(acc.std(ddof=1)),
                "ci": [float(low), float(high)],
            }
        )
    return rows


def results_table(results: dict[str, Runs], timing: bool = True) -> str:
    """Method | trainable | final test accuracy: mean ± std, 95 % CI of the mean | s / epoch
    (``timing=False``: without the time per epoch)."""
    seconds = [float(np.mean(runs.seconds)) for runs in results.values()] if timing else None
    seeds = len(next(iter(results.values())).seeds)
    return _accuracy_table(_accuracy_rows(results), seeds, seconds)


def _accuracy_table(rows: list[dict], seeds: int, seconds: list[float] | None = None) -> str:
    head = f"{'method':<18}{'trainable':>10}  {'test accuracy (%)':<17}{'95 % CI':>15}"
    lines = [head + (f"{'s / epoch':>11}" if seconds else "")]
    for i, row in enumerate(rows):
        interval = "{:.2f}-{:.2f}".format(*row["ci"])
        lines.append(
            f"{row['method']:<18}{row['trainable']:>10,}  {row['mean']:>6.2f} ± "
            f"{row['std']:<6.2f}{interval:>17}" + (f"{seconds[i]:>9.2f} s" if seconds else "")
        )
    note = "; s / epoch: all seeds together" if seconds else ""
    return "\n".join(lines) + f"\n({seeds} seeds each{note})"


def run_summary(results: dict[str, Runs], pretrained_accuracy: float, conclusions) -> dict:
    """The run's results as data: the accuracy table, the pretrained model's accuracy (%) and
    {conclusion: {"verdict", "sentence", "comparisons"}}, where ``conclusions`` gives each
    (verdict, sentence, the Comparisons it rests on[, a label for each]). ``summary_text``
    prints it, ``write_results`` saves it; the README and experiments/stability.py read the
    saved file (the per-seed values let the stability run pool seed sets), never printed text."""
    return {
        "seeds": len(next(iter(results.values())).seeds),
        "pretrained_accuracy": 100 * float(pretrained_accuracy),
        "methods": _accuracy_rows(results),
        "conclusions": {
            key: {
                "verdict": verdict,
                "sentence": sentence,
                "comparisons": [_comparison_data(c) for c in comparisons],
                "labels": [str(x) for x in labels[0]] if labels else [],
            }
            for key, (verdict, sentence, comparisons, *labels) in conclusions.items()
        },
    }


def _comparison_data(c: Comparison) -> dict:
    keep = ("a", "b", "diff", "low", "high", "p", "p_holm", "family", "test", "n")
    return {**{k: getattr(c, k) for k in keep}, "values": [list(v) for v in c.values]}


def pooled(runs_of_one_conclusion: list[list[dict]]) -> list[Comparison]:
    """One conclusion's comparisons from several seed sets (each a list of ``_comparison_data``
    dicts), pooled: the per-seed values joined, the test rerun, Holm again within a family."""
    joined = []
    for parts in zip(*runs_of_one_conclusion, strict=True):
        first = parts[0]
        a = [x for part in parts for x in part["values"][0]]
        b = [x for part in parts for x in part["values"][1]]
        joined.append(compare_values(first["a"], a, first["b"], b, "paired" in first["test"]))
    return holm(joined) if len(joined) > 1 else joined


def summary_text(summary: dict) -> str:
    """What the notebook's summary cell prints, from ``run_summary``'s data alone."""
    conclusions = summary["conclusions"]
    return "\n".join(
        [
            _accuracy_table(summary["methods"], summary["seeds"]),
            f"pretrained model on rotated digits: {summary['pretrained_accuracy']:.2f}%",
            "",
            _verdict_table({key: c["verdict"] for key, c in conclusions.items()}),
            "",
            *(wrap(f"- {key}: {c['sentence']}", indent="  ") for key, c in conclusions.items()),
        ]
    )


RESULTS_FILE = REPO / "figures" / "results.json"


def write_results(summary: dict) -> Path:
    """Save ``summary`` as JSON: to $DORA_RESULTS if set (tests, checks and the stability runs
    write elsewhere), else to figures/results.json, beside the figures of the same run."""
    path = Path(os.environ.get("DORA_RESULTS") or RESULTS_FILE)
    _write_json(path, summary)
    return path


# ---- How fine-tuning moves the weights: the DoRA paper's Figure 2 (notebook: 10) --------------


def relative_change(weight: torch.Tensor, weight0: torch.Tensor) -> dict[str, float]:
    """Figure 2's measures of one fine-tuned weight against the pretrained one, over rows n:

    dD       = mean_n ( 1 - cos(W[n], W0[n]) )                  (the paper's direction change)
    dM       = mean_n | ||W[n]|| - ||W0[n]|| | / ||W0[n]||       (magnitude change, relative)
    rotation = mean_n ( dD_n / (1 - dD_n) )                      (the dM a pure rotation gives)

    ``rotation`` is the relative magnitude change the same per-row direction changes would give
    if every row's update were orthogonal to the row: a point with dM == rotation lies on the
    rotation curve, and only an update with a component along W0[n] moves it off. A row turned
    by 90 degrees or more has no such rotation: it counts in dD and dM, is left out of
    ``rotation`` (NaN if every row is) and is counted in ``turned``."""
    weight, weight0 = (w.detach().to("cpu", torch.float64).flatten(1) for w in (weight, weight0))
    if weight.shape != weight0.shape:
        raise ValueError(f"weights of shapes {tuple(weight.shape)} and {tuple(weight0.shape)}")
    m, m0 = weight.norm(dim=1), weight0.norm(dim=1)
    if not (m0 > 0).all():
        raise ValueError("a pretrained row is all zero: its relative magnitude change is undefined")
    cos = F.cosine_similarity(weight, weight0, dim=1)
    reachable = cos > 0
    return {
        "dD": (1 - cos).mean().item(),
        "dM": ((m - m0).abs() / m0).mean().item(),
        # dD_n / (1 - dD_n) = 1 / cos_n - 1, over the rows a rotation can reach
        "rotation": (1 / cos[reachable] - 1).mean().item() if reachable.any() else math.nan,
        "turned": int((~reachable).sum()),
    }


def figure2_points(runs: Runs, pretrained: nn.Module, layers) -> list[dict]:
    """One point per (seed, checkpoint, layer): ``relative_change``'s dD, dM and rotation, with
    ``seed``, ``checkpoint`` (the epoch the weights were recorded after) and ``layer``.

    ``runs`` must hold recorded weights (``train(..., record_weights=True)``)."""
    if not runs.weights:
        raise ValueError("these runs recorded no weights: train them with record_weights=True")
    weights0 = layer_weights(pretrained)
    missing = [layer for layer in layers if layer not in weights0]
    if missing:
        raise ValueError(f"no layer named {missing} in the model (it has {list(weights0)})")
    return [
        {
            "seed": seed,
            "checkpoint": epoch,
            "layer": layer,
            **relative_change(w[layer], weights0[layer]),
        }
        for seed, checkpoints in zip(runs.seeds, runs.weights, strict=True)
        for epoch, w in enumerate(checkpoints, start=1)
        for layer in layers
    ]


def _by_seed(points: list[dict]) -> dict[int, list[dict]]:
    if not points:
        raise ValueError("no points")
    seeds: dict[int, list[dict]] = {}
    for p in points:
        seeds.setdefault(p["seed"], []).append(p)
    return seeds


def _least_squares(x, y) -> tuple[float, float]:
    """(slope, intercept) of y on x by least squares with an intercept."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0:
        raise ValueError("a slope needs at least 3 points with different dD")
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def _rotation_slope(points: list[dict]) -> float:
    """The slope of the rotation reference on dD, over the points that have one."""
    have = [p for p in points if math.isfinite(p["rotation"])]
    if len(have) < 3:
        return math.nan
    return _least_squares([p["dD"] for p in have], [p["rotation"] for p in have])[0]


def figure2_slopes(points: list[dict]) -> dict:
    """Per seed, the least-squares slope (with intercept) of relative dM on dD over all its
    layers and checkpoints; their mean and 95 % t-interval over seeds.

    With an intercept, the slope says how much more a layer's magnitude changes where its
    direction changes more: "dM follows dD". A magnitude change that happens whatever the
    direction change (DoRA trains m on its own) goes into the intercept; through the origin it
    would be read as steep coupling instead. The same fit on each point's rotation reference
    gives the slope a pure rotation would have over the same dD values (about 1 for small dD).
    Seeds are the replicates: the points of one seed share its run and are not independent.

    Returns {"seeds", "slope" (per seed), "intercept" (per seed), "rotation" (per seed), "mean",
    "low", "high", "rotation_mean"}."""
    seeds = _by_seed(points)
    fits = [_least_squares([p["dD"] for p in s], [p["dM"] for p in s]) for s in seeds.values()]
    rotation = [_rotation_slope(s) for s in seeds.values()]
    slope = np.array([f[0] for f in fits])
    low, high = _mean_interval(slope)
    return {
        "seeds": list(seeds),
        "slope": slope.tolist(),
        "intercept": [f[1] for f in fits],
        "rotation": rotation,
        "mean": float(slope.mean()),
        "low": float(low),
        "high": float(high),
        "rotation_mean": float(np.nanmean(rotation)) if np.isfinite(rotation).any() else math.nan,
    }


def slope_ratio(points_a: list[dict], points_b: list[dict], paired: bool | None = None) -> dict:
    """Slope of A over slope of B (``figure2_slopes``), with its 95 % interval.

    Paired by seed when both ran the same seeds (``paired=None`` decides; False forces the
    unpaired form): seed k of A and of B share the adapter's init and batch order, so the
    per-seed log-ratio log(slope_a[k] / slope_b[k]) is tested with a one-sample t on n - 1
    degrees, and its mean and interval are exponentiated (a geometric-mean ratio). Logs make a
    ratio symmetric (A/B and B/A give reciprocal intervals) and tame its skew. Unpaired: Welch's
    interval on the difference of mean log-slopes. When a slope is not positive the log does not
    exist: then the per-seed ratios' arithmetic mean and t-interval (paired only).

    Returns {"ratio", "low", "high", "paired", "scale" ("log" or "linear"), "n", "per_seed"}."""
    from scipy import stats

    a, b = figure2_slopes(points_a), figure2_slopes(points_b)
    same = a["seeds"] == b["seeds"]
    if paired is None:
        paired = same
    elif paired and not same:
        raise ValueError(f"pairing needs the same seeds, got {a['seeds']} and {b['seeds']}")
    sa, sb = np.array(a["slope"]), np.array(b["slope"])
    positive = (sa > 0).all() and (sb > 0).all()
    per_seed = (sa / sb).tolist() if paired else None
    if paired and positive:
        low, high = _mean_interval(np.log(sa / sb))
        ratio, scale = float(np.exp(np.log(sa / sb).mean())), "log"
        low, high = math.exp(low), math.exp(high)
    elif paired:
        ratio, scale = float((sa / sb).mean()), "linear"
        low, high = _mean_interval(sa / sb)
    elif positive:
        la, lb = np.log(sa), np.log(sb)
        va, vb = la.var(ddof=1) / len(la), lb.var(ddof=1) / len(lb)
        df = (va + vb) ** 2 / (va**2 / (len(la) - 1) + vb**2 / (len(lb) - 1))
        half = stats.t.ppf(0.5 + LEVEL / 2, df) * math.sqrt(va + vb)
        diff, scale = la.mean() - lb.mean(), "log"
        ratio, low, high = math.exp(diff), math.exp(diff - half), math.exp(diff + half)
    else:
        raise ValueError("an unpaired ratio needs positive slopes")
    n = min(len(sa), len(sb))
    return {
        "ratio": float(ratio),
        "low": float(low),
        "high": float(high),
        "paired": paired,
        "scale": scale,
        "n": n,
        "per_seed": per_seed,
    }


def checkpoint_correlations(points: list[dict]) -> dict[int, dict]:
    """The correlation of relative dM with dD across layers, at each checkpoint on its own.

    Per seed and checkpoint, Pearson's r over that checkpoint's layers (no pooling over time:
    both measures grow during training, a trend that says nothing about layer-to-layer
    coupling); then, per checkpoint, the mean over seeds and its 95 % interval, computed on
    Fisher's z = atanh(r) (bounded r is skewed near +-1; z is near normal) and mapped back.

    Returns {checkpoint: {"r" (per seed), "mean", "low", "high"}}."""
    out = {}
    checkpoints = sorted({p["checkpoint"] for p in points})
    for checkpoint in checkpoints:
        rs = []
        for seed_points in _by_seed(points).values():
            here = [p for p in seed_points if p["checkpoint"] == checkpoint]
            if len(here) < 3:
                raise ValueError(f"checkpoint {checkpoint}: a correlation needs 3 or more layers")
            rs.append(float(np.corrcoef([p["dD"] for p in here], [p["dM"] for p in here])[0, 1]))
        z = np.arctanh(np.clip(rs, -1 + 1e-12, 1 - 1e-12))
        low, high = _mean_interval(z)
        out[checkpoint] = {
            "r": [float(r) for r in rs],
            "mean": float(np.tanh(z.mean())),
            "low": float(np.tanh(low)),
            "high": float(np.tanh(high)),
        }
    return out


def full_ft_pattern_verdict(points: list[dict], paper: float):
    """(verdict, sentence): does full fine-tuning show the paper's negative dD-dM correlation?

    'negative, as in the paper' when the interval is below 0 at every checkpoint; 'positive,
    not the paper's pattern' when above 0 at every one; otherwise 'not settled' (checkpoints
    disagree or an interval covers 0). The sentence adds the slope against the rotation curve."""
    corr = checkpoint_correlations(points)
    below = [c for c, v in corr.items() if v["high"] < 0]
    above = [c for c, v in corr.items() if v["low"] > 0]
    if len(below) == len(corr):
        verdict = "negative, as in the paper"
    elif len(above) == len(corr):
        verdict = "positive, not the paper's pattern"
    else:
        verdict = "not settled"
    slopes = figure2_slopes(points)
    cells = "; ".join(
        f"checkpoint {c}: r {v['mean']:+.2f} (95 % CI {v['low']:+.2f} to {v['high']:+.2f})"
        for c, v in corr.items()
    )
    sentence = (
        f"Full fine-tuning, correlation of relative magnitude and direction change across layers "
        f"({len(slopes['seeds'])} seeds), {cells}; paper {paper:+.2f} (section 3.2, Figure 2): "
        f"{verdict}. Its slope is {slopes['mean']:.2f} (95 % CI {slopes['low']:.2f} to "
        f"{slopes['high']:.2f}) against {slopes['rotation_mean']:.2f} for a pure rotation over "
        f"the same direction changes."
    )
    return verdict, sentence


def decoupling_verdict(points: dict[str, list[dict]], a: str = "DoRA", b: str = "LoRA"):
    """(verdict, sentence): does A's magnitude change follow its direction change less than B's?

    From ``slope_ratio`` (paired by seed): 'decoupled' when the 95 % interval of slope A / slope
    B lies below 1, 'more coupled' when above 1, else 'no difference detected'. The sentence
    gives every other method's ratio too (e.g. DoRA / full FT), as numbers, not verdicts."""
    ratio = slope_ratio(points[a], points[b])
    if ratio["high"] < 1:
        verdict = "decoupled"
    elif ratio["low"] > 1:
        verdict = "more coupled"
    else:
        verdict = "no difference detected"
    others = [
        f"{a} / {name} {r['ratio']:.2f} (95 % CI {r['low']:.2f} to {r['high']:.2f})"
        for name in points
        if name not in (a, b)
        for r in [slope_ratio(points[a], points[name])]
    ]
    slopes = {name: figure2_slopes(pts) for name, pts in points.items()}
    words = ", ".join(f"{name} {s['mean']:.2f}" for name, s in slopes.items())
    sentence = (
        f"Slope of relative magnitude change on direction change: {words}. {a} / {b} = "
        f"{ratio['ratio']:.2f} (95 % CI {ratio['low']:.2f} to {ratio['high']:.2f}, "
        f"{'paired by seed' if ratio['paired'] else 'unpaired'}, {ratio['n']} seeds): {verdict}"
        + (f"; {'; '.join(others)}." if others else ".")
    )
    return verdict, sentence


def figure2_analysis(points: dict[str, list[dict]], paper: dict[str, float]) -> dict:
    """Everything above as JSON-ready data: per method its slopes and per-checkpoint
    correlations (with the paper's r), the ratios of DoRA's slope to every other method's
    (paired), and the two verdicts (when the methods are there)."""
    out: dict = {"methods": {}, "ratios": {}, "verdicts": {}}
    for name, pts in points.items():
        out["methods"][name] = {
            "slope": figure2_slopes(pts),
            "correlations": {str(c): v for c, v in checkpoint_correlations(pts).items()},
            "paper_r": paper.get(name),
            "turned": sum(p.get("turned", 0) for p in pts),  # rows turned by 90 degrees or more
        }
    for a in points:
        for b in points:
            if a != b and a == "DoRA":
                out["ratios"][f"{a} / {b}"] = slope_ratio(points[a], points[b])
    if "full FT" in points:
        out["verdicts"]["full FT pattern"] = dict(
            zip(
                ("verdict", "sentence"),
                full_ft_pattern_verdict(points["full FT"], paper["full FT"]),
                strict=True,
            )
        )
    if {"DoRA", "LoRA"} <= set(points):
        out["verdicts"]["DoRA decoupled vs LoRA"] = dict(
            zip(("verdict", "sentence"), decoupling_verdict(points), strict=True)
        )
    return out


def figure2_table(analysis: dict) -> str:
    """``figure2_analysis``'s numbers as two narrow tables (each line fits a notebook's output
    column): per method the slope with its interval, the rotation's slope and the paper's r;
    then r across layers at each checkpoint (mean, 95 % interval); then the ratios."""
    methods = analysis["methods"]
    checkpoints = list(next(iter(methods.values()))["correlations"])
    lines = [f"{'method':<9}{'slope [95 % CI]':>22}{'rotation':>10}{'paper r':>9}"]
    for name, m in methods.items():
        paper = f"{m['paper_r']:+.2f}" if m["paper_r"] is not None else "-"
        s = m["slope"]
        lines.append(f"{name:<9}{_bracket(s, '.2f'):>22}{s['rotation_mean']:>10.2f}{paper:>9}")
    lines += ["", f"{'method':<9}" + "".join(f"{'r at ' + c:>22}" for c in checkpoints)]
    for name, m in methods.items():
        lines.append(
            f"{name:<9}" + "".join(f"{_bracket(v, '+.2f'):>22}" for v in m["correlations"].values())
        )
    lines.append("")
    for key, r in analysis["ratios"].items():
        kind = "paired by seed" if r["paired"] else "unpaired"
        lines.append(f"slope {key}: {r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}] ({kind})")
    turned = {name: m["turned"] for name, m in methods.items() if m.get("turned")}
    if turned:
        counts = ", ".join(f"{name} {n:,}" for name, n in turned.items())
        lines.append(
            wrap(
                f"rows turned by 90 degrees or more, over all seeds, layers and checkpoints: "
                f"{counts} (in dD and dM; no pure rotation reaches them, so not in the rotation "
                "column)"
            )
        )
    return "\n".join(lines)


def _bracket(v: dict, spec: str) -> str:
    """'mean [low, high]' of a dict with those keys."""
    return f"{v['mean']:{spec}} [{v['low']:{spec}}, {v['high']:{spec}}]"


def plot_figure2(points: dict[str, list[dict]], title: str):
    """Figure 2 as a test: relative dM against dD, one panel per method (shared axes), every
    seed; the pure-rotation curve dD / (1 - dD) on each; the method's mean fitted line.

    Colour: checkpoint; marker: the layer's kind (last part of its name, e.g. q or v)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(points), figsize=(4 * len(points), 3.8), sharex=True, sharey=True, squeeze=False
    )
    markers = "osD^vP*X"
    all_points = [p for pts in points.values() for p in pts]
    kinds = list(dict.fromkeys(p["layer"].rsplit(".", 1)[-1] for p in all_points))
    checkpoints = sorted({p["checkpoint"] for p in all_points})
    colour = {
        c: plt.cm.viridis(i / max(len(checkpoints) - 1, 1)) for i, c in enumerate(checkpoints)
    }
    x = np.linspace(0, max(p["dD"] for p in all_points) * 1.05, 100)
    for ax, (method, pts) in zip(axes[0], points.items(), strict=True):
        groups: dict[tuple[int, int], list[dict]] = {}  # one scatter per checkpoint and kind
        for p in pts:
            kind = kinds.index(p["layer"].rsplit(".", 1)[-1])
            groups.setdefault((p["checkpoint"], kind), []).append(p)
        for (checkpoint, kind), group in sorted(groups.items()):  # later checkpoints on top
            ax.scatter(
                [p["dD"] for p in group],
                [p["dM"] for p in group],
                color=colour[checkpoint],
                s=12,
                marker=markers[kind % len(markers)],
            )
        ax.plot(x, x / (1 - x), color="k", ls="--", lw=1)
        s = figure2_slopes(pts)
        own = np.linspace(min(p["dD"] for p in pts), max(p["dD"] for p in pts), 20)
        ax.plot(own, np.mean(s["intercept"]) + s["mean"] * own, color="C3", lw=1.2)
        ax.set_title(
            f"{method}: slope {s['mean']:.2f} [{s['low']:.2f}, {s['high']:.2f}]", fontsize=10
        )
        _label(ax, "ΔD (direction change)", "ΔM / ||W0[n]|| (relative)")
        ax.label_outer()
    handles = [
        plt.Line2D([], [], color="k", ls="--", label="pure rotation: ΔD / (1 - ΔD)"),
        plt.Line2D([], [], color="C3", label="fitted line (mean over seeds)"),
    ]
    handles += [
        plt.Line2D(
            [], [], marker=markers[i % len(markers)], ls="", color="gray", label=f"layer {k}"
        )
        for i, k in enumerate(kinds)
    ]
    handles += [
        plt.Line2D([], [], marker="o", ls="", color=colour[c], label=f"checkpoint {c}")
        for c in checkpoints
    ]
    columns = min(len(handles), 2 * len(points) + 1)  # fits the figure's width
    rows = -(-len(handles) // columns)
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=7, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.02 + 0.05 * rows, 1, 1))  # the legend's rows, inside the figure
    return fig


# ---- Shipping: merge, time, save the adapter, Hugging Face PEFT (notebook: 14-18) ---------


OPTIONAL_PACKAGES = ("peft", "transformers", "torchao", "accelerate")  # PEFT and what it loads


class optional_part:  # noqa: N801  (used as a statement: with helpers.optional_part(...):)
    """``with optional_part("the comparison with PEFT"): ...`` runs an optional part of the
    notebook; an exception raised inside an optional package (PEFT imports fine but fails in
    use, e.g. an older torchao makes get_peft_model raise ImportError) ends the block with one
    line and the notebook goes on. Exceptions from anywhere else (this project's code) are
    not swallowed."""

    def __init__(self, what: str, packages=OPTIONAL_PACKAGES):
        self.what, self.packages = what, tuple(packages)
        self.skipped: BaseException | None = None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or not isinstance(error, Exception) or not self._raised_inside(tb):
            return False
        self.skipped = error
        text = " ".join(str(error).split())[:160]
        print(wrap(f"Skipping {self.what}: PEFT fails in use ({type(error).__name__}: {text})."))
        return True

    def _raised_inside(self, tb) -> bool:
        while tb is not None:
            if tb.tb_frame.f_globals.get("__name__", "").partition(".")[0] in self.packages:
                return True
            tb = tb.tb_next
        return False


def merge_adapters(model: nn.Module, merge) -> nn.Module:
    """A copy of ``model`` in which every adapter layer is replaced by ``merge(layer)``.

    ``merge`` is the notebook's function that turns one adapter layer into a plain
    ``nn.Linear``, or a dict of them by adapter class, e.g. ``{LinearWithDoRA: merge,
    Conv2dWithDoRA: merge_conv}``; this helper only finds the layers and swaps them. ``model``
    is not modified."""
    merges = merge if isinstance(merge, dict) else {nn.Module: merge}
    model = copy.deepcopy(model)
    for name, layer in adapter_layers(model).items():
        kind = next((kind for kind in merges if isinstance(layer, kind)), None)
        if kind is None:
            raise TypeError(
                f"layer {name!r} is a {type(layer).__name__} and no merge function was given for "
                f"it: add {{{type(layer).__name__}: <its merge function>}} to the dict"
            )
        model = _replace(model, name, merges[kind](layer))
    return model


@torch.inference_mode()
def inference_ms(model: nn.Module, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``model(x)`` in eval and inference mode (device synchronised)."""
    was_training = model.training
    model.eval()
    times = [timed(lambda: model(x), x.device)[0] for _ in range(warmup + repeats)][warmup:]
    model.train(was_training)
    return 1000 * statistics.median(times)


# ---- Plots: each draws only the numbers it is given (fixed sizes: nbval compares their text) ----


def plot_digits(images: torch.Tensor, rotated: torch.Tensor, labels: torch.Tensor):
    """Two rows of digits: as pretrained on (top) and as fine-tuned on (bottom)."""
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.1 * n, 2.8))
    for i in range(n):
        for row, batch in enumerate((images, rotated)):
            axes[row, i].imshow(batch[i].cpu().numpy(), cmap="gray_r")
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
        axes[0, i].set_title(str(int(labels[i])))
    axes[0, 0].set_ylabel("MNIST")
    axes[1, 0].set_ylabel("rotated")
    fig.suptitle("The same test digits, upright and rotated")
    fig.tight_layout()
    return fig


def plot_idea():
    """The idea in two dimensions: one weight row w0 as a length times a direction, and what
    LoRA and DoRA can do to it. Computed, not drawn by hand: a rank-1 update moves w0 along one
    line, so LoRA's length and angle change together; DoRA takes the direction of a point on
    that line, V / ||V||, and gives it a length m of its own."""
    import matplotlib.pyplot as plt

    w0 = torch.tensor([1.0, 0.35])
    across = torch.tensor([-w0[1], w0[0]]) / w0.norm()  # perpendicular to w0
    d = across + 0.3 * w0 / w0.norm()  # the update's direction b a: mostly across w0
    lora = [w0 + t * d for t in (-0.6, -0.3, 0.3, 0.6)]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), sharex=True, sharey=True)

    def arrow(ax, v, color, alpha=1.0, lw=2):
        style = {"arrowstyle": "->", "color": color, "lw": lw, "alpha": alpha}
        ax.annotate("", xy=tuple(v.tolist()), xytext=(0, 0), arrowprops=style)

    def key(ax, color, label, lw=2, alpha=1.0):
        ax.plot([], [], color=color, lw=lw, alpha=alpha, label=label)

    arrow(axes[0], w0, "C0")
    arrow(axes[0], 0.5 * w0 / w0.norm(), "C3")
    key(axes[0], "C0", f"w0, length ||w0|| = {w0.norm():.2f}")
    key(axes[0], "C3", "its direction w0 / ||w0||\n(drawn at length 0.5)")
    axes[0].set_title("a weight row: a length and a direction")
    line = torch.stack([w0 - 0.8 * d, w0 + 0.8 * d])
    for ax in axes[1:]:
        ax.plot(line[:, 0], line[:, 1], ls=":", color="C1")
        arrow(ax, w0, "C0")
    for v in lora:
        arrow(axes[1], v, "C1", alpha=0.7)
    key(axes[1], "C0", "w0")
    key(axes[1], "C1", "w0 + updates along one line:\nlength and angle change together")
    axes[1].set_title("LoRA: w0 + a rank-1 update")
    direction = lora[-1] / lora[-1].norm()
    arrow(axes[2], lora[-1], "C1", alpha=0.4, lw=7)  # wide, under the m V / ||V|| on its ray
    for m in (0.6, 0.9, 1.2, 1.5):
        arrow(axes[2], m * direction, "C2")
    key(axes[2], "C0", "w0")
    key(axes[2], "C1", "V = w0 + one of those updates", lw=7, alpha=0.4)
    key(axes[2], "C2", "m V / ||V||: V's direction,\nany length m")
    axes[2].set_title("DoRA: V's direction, a length m")
    for ax in axes:
        ax.set_aspect("equal")
        ax.axhline(0, color="0.85", lw=0.8)
        ax.axvline(0, color="0.85", lw=0.8)
        ax.set_xlim(-0.3, 1.8)
        ax.set_ylim(-0.6, 1.9)  # room for the legends above the dotted line
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_methods(results: dict[str, Runs], start: float, title: str, pair=("DoRA", "LoRA")):
    """Left: mean test accuracy per epoch of each method from epoch 0 (``start``, the
    pretrained model's accuracy), band: the 95 % interval of the mean over seeds. Right: the
    per-seed difference of ``pair`` (A - B) per epoch, its mean and 95 % interval: where the
    two methods' curves coincide on the left, the right panel shows how far apart they are."""
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_diff) = plt.subplots(1, 2, figsize=(10, 4.4))
    for i, (name, runs) in enumerate(results.items()):
        acc = np.concatenate([np.full((len(runs.seeds), 1), start), runs.test_acc], 1) * 100
        epochs = np.arange(acc.shape[1])
        low, high = np.array([_mean_interval(acc[:, e]) for e in epochs[1:]]).T
        style = {"marker": "osD^v"[i % 5], "ls": "-" if i % 2 == 0 else "--"}  # none hidden
        ax_acc.plot(epochs, acc.mean(0), color=f"C{i}", label=name, **style)
        ax_acc.fill_between(epochs[1:], low, high, color=f"C{i}", alpha=0.2)
    a, b = (100 * results[name].test_acc for name in pair)
    diff = a - b
    epochs = np.arange(1, diff.shape[1] + 1)
    low, high = np.array([_mean_interval(diff[:, e - 1]) for e in epochs]).T
    ax_diff.axhline(0, color="0.5", lw=1)
    ax_diff.plot(epochs, diff.mean(0), marker="o", color="C2", label=f"{pair[0]} - {pair[1]}")
    ax_diff.fill_between(epochs, low, high, color="C2", alpha=0.2, label="95 % interval")
    _label(ax_acc, "epoch (0: the pretrained model)", "test accuracy (%)", integer_x=True)
    _label(ax_diff, "epoch", "difference (points)", integer_x=True)
    ax_acc.legend(title=f"mean of {a.shape[0]} seeds", loc="lower right")
    ax_acc.set_ylim(start * 100 - 2, None)
    ax_diff.legend(loc="upper right")
    ax_diff.set_title(f"{pair[0]} - {pair[1]}: mean of the per-seed differences")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_paired(pairs: dict[str, tuple[Runs, Runs]], title: str):
    """One row per comparison A - B: each seed's difference in final test accuracy (dots),
    their mean and its 95 % interval (bar); the dashed line is no difference."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.8 + 0.9 * len(pairs)))
    for row, (runs_a, runs_b) in enumerate(reversed(pairs.values())):
        d = runs_a.final - runs_b.final
        low, high = _mean_interval(d)
        lane = 0.08 * (np.argsort(np.argsort(d)) % 3 - 1)  # neighbours in value: other lanes
        ax.plot(d, row + 0.18 + lane, "o", color="0.55", ms=4)
        ax.errorbar(
            d.mean(),
            row - 0.12,
            xerr=[[d.mean() - low], [high - d.mean()]],
            fmt="D",
            color="C3",
            capsize=4,
        )
    ax.plot([], [], "o", color="0.55", ms=4, label="one seed")
    ax.errorbar([], [], xerr=[], fmt="D", color="C3", capsize=4, label="mean, 95 % interval")
    ax.axvline(0, color="0.4", ls="--", lw=1)
    ax.set_yticks(range(len(pairs)), list(reversed(list(pairs))))
    ax.set_ylim(-0.6, len(pairs) - 0.4)
    ax.set_xlabel("difference in final test accuracy (points)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    fig.legend(loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def plot_rank_sweep(sweep: dict[tuple[str, int], Runs], reference: Runs, title: str):
    """Final accuracy (mean ± std) against rank and against trainable parameters."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ref = reference.final
    methods = list(dict.fromkeys(method for method, _ in sweep))
    for i, method in enumerate(methods):
        ranks = sorted(rank for m, rank in sweep if m == method)
        accs = [sweep[method, r].final for r in ranks]
        params = [sweep[method, r].trainable for r in ranks]
        mean, std = np.array([a.mean() for a in accs]), np.array([a.std(ddof=1) for a in accs])
        for ax, x in zip(axes, (ranks, params), strict=True):
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, color=f"C{i + 1}", label=method)
    for ax, xlabel in zip(axes, ("rank r", "trainable parameters"), strict=True):
        ax.axhline(ref.mean(), color="C0", label="full FT")
        ax.axhspan(
            ref.mean() - ref.std(ddof=1), ref.mean() + ref.std(ddof=1), color="C0", alpha=0.15
        )
        ax.set_xscale("log", base=2 if xlabel == "rank r" else 10)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        _label(ax, xlabel, "final test accuracy (%)")
    axes[0].set_xticks(ranks, [str(r) for r in ranks])
    counts = [runs.trainable for runs in sweep.values()]
    ticks = [
        m * 10**k for k in range(8) for m in (1, 2, 5) if min(counts) <= m * 10**k <= max(counts)
    ]
    axes[1].set_xticks(ticks, [f"{t:,}" for t in ticks])  # 1-2-5 steps: readable on a log axis
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _label(ax, xlabel: str, ylabel: str, integer_x: bool = False) -> None:
    if integer_x:
        ax.xaxis.get_major_locator().set_params(integer=True)  # no "epoch 2.5"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
