"""Plumbing for DoRA.ipynb, in the order the notebook uses it.

The notebook builds the LoRA and DoRA layers; this file holds what the story should not be
cluttered by. Each section names the notebook sections it serves:

    setup ............................ Setup
    models and adapters .............. 3, 13
    data ............................. 4, 5    (downloading MNIST: dora_tutorial/mnist_files.py)
    training, many seeds at once ..... 4, 5, 6, 8
    evidence ......................... 5, 6, 7, 8, 11
    how fine-tuning moves weights .... 7
    shipping ......................... 9, 10, 13
    plots ............................ all

Self-contained instruments live in the package dora_tutorial/, one module each, and what the
notebook uses from them is imported below: downloading MNIST (mnist_files), adapter files and
PEFT's names (adapter_files), bytes kept for backward (memory, sections 2b and 8), the
conformance check (check_dora, section 12). Maintainers' scripts (tools/) are never imported here.

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
    "holm",
    "in_words",
    "results_table",
    "run_summary",
    "summary_text",
    "write_results",
    # how fine-tuning moves the weights (7)
    "decomposition_points",
    "correlations",
    "sign_verdict",
    "decomposition_table",
    # shipping (9, 10, 12, 13)
    "merge_adapters",
    "inference_ms",
    "save_adapter",
    "load_adapter",
    "save_peft_adapter",
    "load_peft_adapter",
    "check_dora",
    # plots
    "plot_digits",
    "plot_history",
    "plot_methods",
    "plot_rank_sweep",
    "plot_decomposition",
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


# ---- Models and adapters: the MLP, wrapping layers, counting (notebook: 3, 13) ---------------


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


# ---- Data: MNIST as tensors, the rotated-digits task (notebook: 4, 5) ------------------------

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


# ---- Training: one loop for one model or many seeds at once (notebook: 4, 5, 6, 8) -----------


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
            batch_losses = batched_loss(stacked, task.train_x[idx], task.train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            batch_losses.sum().backward()  # seeds share no parameter: each gets its own grad
            optimizer.step()
            total += batch_losses.detach() * idx.shape[1]  # stays on the device: no sync
        sync(device)
        seconds.append(time.perf_counter() - start)
        losses.append((total / n).cpu().numpy())
        template.eval()  # evaluated without dropout
        accuracies.append(_accuracies(logits, stacked, eval_x, eval_y))
        template.train()
        if record_weights or epoch == epochs:
            _write_back(stacked, models)  # the models hold the trained values from here on
        if record_weights:
            for k, model in enumerate(models):
                weights[k].append(layer_weights(model))
        if log is not None:
            acc = 100 * accuracies[-1]
            spread = f" ± {acc.std(ddof=1):.2f}" if len(acc) > 1 else ""
            log(
                f"{name}epoch {epoch}/{epochs}: train loss {losses[-1].mean():.4f}, {evaluate_on} "
                f"accuracy {acc.mean():.2f}{spread} % ({seconds[-1]:.2f} s)"
            )
    trainable = sum(t[0].numel() for t in stacked.values())
    history = np.stack(losses, 1), np.stack(accuracies, 1), seconds
    return Runs(seeds, models, trainable, *history, weights if record_weights else [])


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

    Every model gets the same inputs as a view (``expand``), batched like its parameters: a
    layer may update its activations in place, which vmap allows only for batched tensors."""
    batched, count = torch.func.vmap(logits), len(next(iter(stacked.values())))
    correct = 0
    for i in range(0, len(x), chunk):
        predicted = batched(stacked, x[i : i + chunk].expand(count, -1, -1)).argmax(-1)
        correct = correct + (predicted == y[i : i + chunk]).sum(1)
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


# ---- Evidence: paired tests, intervals, sentences (notebook: 5, 6, 7, 8, 11) -----------------

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

    @property
    def verdict(self) -> str:
        """'ahead', 'behind' or 'no difference detected' (from the Holm p when there is one)."""
        p = self.p if self.p_holm is None else self.p_holm
        if not p < 1 - LEVEL:
            return "no difference detected"
        return "ahead" if self.diff > 0 else "behind"

    def sentence(self) -> str:
        """One sentence from the numbers: the difference, its interval, the test, the verdict."""
        numbers = (
            f"95 % CI {self.low:+.2f} to {self.high:+.2f}; {self.test}, {self.n} seeds, "
            f"p {_p(self.p)}"
        )
        if self.p_holm is not None:
            numbers += f", Holm-adjusted over {self.family} ranks p {_p(self.p_holm)}"
        if self.verdict == "no difference detected":
            return (
                f"{self.a} - {self.b} = {self.diff:+.2f} points ({numbers}): no difference "
                f"detected; these seeds could detect about {self.detectable:.2f} points "
                f"({100 * POWER:.0f} % power)."
            )
        side = "ahead of" if self.verdict == "ahead" else "behind"
        return f"{self.a} is {side} {self.b} by {abs(self.diff):.2f} points ({numbers})."


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def compare(name_a: str, runs_a: Runs, name_b: str, runs_b: Runs) -> Comparison:
    """Compare the final test accuracies of two configurations (see ``Comparison``)."""
    from scipy import stats  # on Colab; imported here so that importing helpers stays quick

    a, b = runs_a.final, runs_b.final
    if min(len(a), len(b)) < 2:
        raise ValueError("a comparison needs at least 2 seeds per configuration")
    if tuple(runs_a.seeds) == tuple(runs_b.seeds):  # paired: seed k vs seed k
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
    return Comparison(name_a, name_b, diff, diff - q * se, diff + q * se, p, n, test, detectable)


def holm(comparisons: list[Comparison]) -> list[Comparison]:
    """The same comparisons with Holm's step-down adjusted p-values (family-wise error 5 %)."""
    m = len(comparisons)
    order = sorted(range(m), key=lambda i: comparisons[i].p)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * comparisons[i].p))
        adjusted[i] = running
    return [replace(c, p_holm=adjusted[i], family=m) for i, c in enumerate(comparisons)]


def _mean_interval(values: np.ndarray) -> tuple[float, float]:
    """The 95 % confidence interval of the mean of ``values`` (t quantile, n - 1 degrees)."""
    from scipy import stats

    if len(values) < 2:
        raise ValueError("an interval needs at least 2 values")
    n, mean = len(values), values.mean()
    half = stats.t.ppf(0.5 + LEVEL / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return mean - half, mean + half


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


def results_table(results: dict[str, Runs]) -> str:
    """Method | trainable | final test accuracy: mean ± std, 95 % CI of the mean | s / epoch."""
    seconds = [float(np.mean(runs.seconds)) for runs in results.values()]
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
    {conclusion: {"verdict", "sentence"}}. ``summary_text`` prints it, ``write_results`` saves
    it; the README and experiments/stability.py read the saved file, never printed text."""
    return {
        "seeds": len(next(iter(results.values())).seeds),
        "pretrained_accuracy": 100 * float(pretrained_accuracy),
        "methods": _accuracy_rows(results),
        "conclusions": {
            key: {"verdict": verdict, "sentence": sentence}
            for key, (verdict, sentence) in conclusions.items()
        },
    }


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


# ---- How fine-tuning moves the weights: the DoRA paper's Figure 2 (notebook: 7) --------------


def decomposition_change(weight: torch.Tensor, weight0: torch.Tensor) -> tuple[float, float]:
    """(dM, dD) of a fine-tuned weight against the pretrained one, over output rows n:

    dM = mean_n | ||W[n]|| - ||W0[n]|| |          (magnitude change)
    dD = mean_n ( 1 - cos(W[n], W0[n]) )          (direction change)
    """
    # In float64 for exact sums; on the CPU first, as MPS has no float64.
    weight, weight0 = (w.detach().to("cpu", torch.float64) for w in (weight, weight0))
    d_m = (weight.norm(dim=1) - weight0.norm(dim=1)).abs().mean()
    d_d = (1 - F.cosine_similarity(weight, weight0, dim=1)).mean()
    return d_m.item(), d_d.item()


def decomposition_points(runs: Runs, pretrained: nn.Module, layers) -> list[dict]:
    """One point per (seed, checkpoint, layer in ``layers``): dD, dM, seed, epoch, layer."""
    weights0 = layer_weights(pretrained)
    points = []
    for seed, checkpoints in zip(runs.seeds, runs.weights, strict=True):
        for epoch, weights in enumerate(checkpoints, start=1):
            for layer in layers:
                d_m, d_d = decomposition_change(weights[layer], weights0[layer])
                points.append({"dD": d_d, "dM": d_m, "seed": seed, "epoch": epoch, "layer": layer})
    return points


def fit_line(x, y) -> tuple[float, float]:
    """Least-squares slope of y on x, and the Pearson correlation r (0 where undefined)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0, 0.0
    return float(np.polyfit(x, y, 1)[0]), float(np.corrcoef(x, y)[0, 1])


def correlations(points: list[dict]) -> dict[str, np.ndarray]:
    """Three correlations of dM with dD, one value per seed each:

    pooled: over all layers and checkpoints of the seed (what the paper's figure shows);
    across layers: over the layers at the last checkpoint;
    within a layer: over one layer's checkpoints, averaged over the layers."""
    out: dict[str, list[float]] = {"pooled": [], "across layers": [], "within a layer": []}
    for seed in dict.fromkeys(p["seed"] for p in points):
        mine = [p for p in points if p["seed"] == seed]
        last = max(p["epoch"] for p in mine)
        out["pooled"].append(_r(mine))
        out["across layers"].append(_r([p for p in mine if p["epoch"] == last]))
        layers = dict.fromkeys(p["layer"] for p in mine)
        out["within a layer"].append(
            np.mean([_r([p for p in mine if p["layer"] == la]) for la in layers])
        )
    return {key: np.array(values) for key, values in out.items()}


def _r(points: list[dict]) -> float:
    return fit_line([p["dD"] for p in points], [p["dM"] for p in points])[1]


def sign_verdict(values: np.ndarray, paper: float) -> tuple[str, float, float]:
    """('reproduces' | 'opposite sign' | 'cannot tell', low, high): the 95 % interval over
    seeds of a correlation, against the sign the paper reports."""
    low, high = _mean_interval(values)
    if low <= 0 <= high:
        return "cannot tell", low, high
    return ("reproduces" if (low > 0) == (paper > 0) else "opposite sign"), low, high


def decomposition_table(points: dict[str, list[dict]], paper: dict[str, float]) -> str:
    """Per method: the three correlations (mean ± std over seeds) and the pooled one's verdict
    against the paper's sign, with its 95 % interval."""
    head = (
        f"{'method':<9}{'r pooled':>14}{'95 % CI':>15}{'r across layers':>17}{'r in a layer':>15}"
    )
    lines = [head + f"{'paper':>7}  verdict"]
    for method, pts in points.items():
        r = correlations(pts)
        verdict, low, high = sign_verdict(r["pooled"], paper[method])
        cells = [f"{r[k].mean():+.2f} ± {r[k].std(ddof=1):.2f}" for k in r]
        lines.append(
            f"{method:<9}{cells[0]:>14}{f'{low:+.2f} to {high:+.2f}':>15}{cells[1]:>17}"
            f"{cells[2]:>15}{paper[method]:>+7.2f}  {verdict}"
        )
    return "\n".join(lines)


# ---- Shipping: merge, time, save the adapter, Hugging Face PEFT (notebook: 9, 10, 13) ---------


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


def plot_history(runs: Runs, title: str):
    """Training loss and test accuracy per epoch of one run (the first seed), side by side."""
    import matplotlib.pyplot as plt

    epochs = np.arange(1, runs.train_loss.shape[1] + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_loss.plot(epochs, runs.train_loss[0], marker="o")
    ax_acc.plot(epochs, 100 * runs.test_acc[0], marker="o", color="C1")
    _label(ax_loss, "epoch", "training loss", integer_x=True)
    _label(ax_acc, "epoch", "test accuracy (%)", integer_x=True)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_methods(results: dict[str, Runs], title: str):
    """Mean training loss and test accuracy per epoch for each method, with a ±1 std band."""
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (name, runs) in enumerate(results.items()):
        for ax, values in ((ax_loss, runs.train_loss), (ax_acc, 100 * runs.test_acc)):
            mean, std = values.mean(0), values.std(0, ddof=1)
            epochs = np.arange(1, len(mean) + 1)
            ax.plot(epochs, mean, marker="o", color=f"C{i}", label=f"{name} (n={len(values)})")
            ax.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.2)
    _label(ax_loss, "epoch", "training loss", integer_x=True)
    _label(ax_acc, "epoch", "test accuracy (%)", integer_x=True)
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
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


def plot_decomposition(points: dict[str, list[dict]], title: str):
    """The DoRA paper's Figure 2: dD (x) against dM (y), one panel per method, every seed.

    Colour: checkpoint (epoch); marker: layer. Panel titles: slope and r over all points."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(4 * len(points), 3.8))
    markers = "osD^vP*X"
    for ax, (method, pts) in zip(np.atleast_1d(axes), points.items(), strict=True):
        layers = list(dict.fromkeys(p["layer"] for p in pts))
        epochs = sorted({p["epoch"] for p in pts})
        for layer in layers:
            mine = [p for p in pts if p["layer"] == layer]
            colours = [
                plt.cm.viridis(epochs.index(p["epoch"]) / max(len(epochs) - 1, 1)) for p in mine
            ]
            ax.scatter(
                [p["dD"] for p in mine],
                [p["dM"] for p in mine],
                c=colours,
                s=14,
                marker=markers[layers.index(layer) % len(markers)],
            )
        slope, r = fit_line([p["dD"] for p in pts], [p["dM"] for p in pts])
        ax.set_title(f"{method}: slope {slope:.2f}, r = {r:+.2f}")
        _label(ax, "ΔD (direction change)", "ΔM (magnitude change)")
    handles = [
        plt.Line2D(
            [], [], marker=markers[i % len(markers)], ls="", color="gray", label=f"layer {name}"
        )
        for i, name in enumerate(layers)
    ]
    handles += [
        plt.Line2D(
            [],
            [],
            marker="o",
            ls="",
            label=f"epoch {e}",
            color=plt.cm.viridis(i / max(len(epochs) - 1, 1)),
        )
        for i, e in enumerate(epochs)
    ]
    fig.legend(handles=handles, loc="center right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    return fig


def _label(ax, xlabel: str, ylabel: str, integer_x: bool = False) -> None:
    if integer_x:
        ax.xaxis.get_major_locator().set_params(integer=True)  # no "epoch 2.5"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
