"""Training: one loop for many seeds of one configuration at once, optimisers, accuracy."""

import copy
import functools
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dora_tutorial.data import Task
from dora_tutorial.models import add_adapters, layer_weights
from dora_tutorial.runtime import seed_everything, sync


@dataclass
class Runs:
    """One configuration trained with several seeds, in seed order: ``test_acc`` and
    ``train_loss`` are (seeds, epochs); ``weights[k][e]``: seed k's weights after epoch e+1."""

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
) -> Runs:
    """Adam on cross-entropy for a module or a list of modules that differ only in their
    trainable parameters (``seeds[k]`` sets model k's batch order).

    All train in one ``vmap`` over their stacked parameters with one Adam over the stacks: Adam
    is element-wise, so this is the algorithm of separate runs. ``curves=False`` evaluates after
    the last epoch only (earlier accuracies are NaN)."""
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
    n, generators = len(task.train_x), [torch.Generator().manual_seed(seed) for seed in seeds]
    losses, accuracies, seconds, weights = [], [], [], []  # weights[e][k]: epoch e, seed k
    template.train()
    for epoch in range(1, epochs + 1):
        start, total = time.perf_counter(), torch.zeros(len(models), device=device)
        # seed k's batches from its own generator, whatever trains beside it
        order = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
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
        if record_weights or epoch == epochs:  # the models hold the trained values from here on
            with torch.no_grad():
                for name, values in stacked.items():
                    for model, value in zip(models, values, strict=True):
                        model.get_parameter(name).copy_(value)
        if record_weights:
            weights.append([layer_weights(model) for model in models])
        if log is not None:
            acc = 100 * accuracies[-1]
            spread = f" ± {acc.std(ddof=1):.2f}" if len(acc) > 1 else ""
            measured = f"{acc.mean():.2f}{spread} %" if not np.isnan(acc).all() else "not measured"
            log(
                f"epoch {epoch}/{epochs}: train loss {losses[-1].mean():.4f}, {evaluate_on} "
                f"accuracy {measured} ({seconds[-1]:.2f} s)"
            )
    trainable = sum(t[0].numel() for t in stacked.values())
    history = np.stack(losses, 1), np.stack(accuracies, 1), seconds
    return Runs(seeds, models, trainable, *history, [list(w) for w in zip(*weights, strict=True)])


def _gather(data: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``data[idx]`` for an (S, batch) index; ``index_select`` copies whole rows, faster."""
    return data.index_select(0, idx.reshape(-1)).view(*idx.shape, *data.shape[1:])


def _stack_parameters(models):
    """({name: (S, ...) leaf} of the trainable parameters, {name: tensor} of the shared rest)."""
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
def _accuracies(logits, stacked, x, y, chunk: int = 2048) -> np.ndarray:
    """(S,) accuracies on (x, y). Inputs go in unbatched, so the frozen ``x W0^T`` is computed
    once for all models; a layer vmap refuses that way (an in-place update) gets them expanded."""
    count, inputs = len(next(iter(stacked.values()))), x.split(chunk)
    try:
        shared = torch.func.vmap(logits, in_dims=(0, None))
        predicted = [shared(stacked, v).argmax(-1) for v in inputs]
    except RuntimeError:  # a real error is raised again by the expanded call
        each = torch.func.vmap(logits)
        predicted = [each(stacked, v.expand(count, *v.shape)).argmax(-1) for v in inputs]
    return ((torch.cat(predicted, 1) == y).sum(1) / len(x)).cpu().numpy()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4096) -> float:
    """Fraction of rows of ``x`` whose arg-max logit equals ``y`` (in eval mode)."""
    was_training = model.training
    model.to(x.device).eval()
    correct = sum(
        (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    model.train(was_training)
    return correct / len(x)


def adamw(model: nn.Module, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW without weight decay on DoRA's magnitudes (ours and PEFT's) and biases: decay
    would shrink each row's length instead of leaving it where the data put it."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            last = name.split(".")[-1]
            exempt = last in ("m", "bias") or "lora_magnitude_vector" in name
            (keep if exempt else decay).append(p)
    groups = [{"params": decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam, fused where torch and the device have the kernel (the same algorithm)."""
    params = list(params)
    fused = all(_fused_adam_works(p.device, p.dtype) for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)  # None: torch's default


@functools.cache
def _fused_adam_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether fused Adam runs here: torch checks part of that only at ``step()``, so try one."""
    try:
        p = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
        p.grad = torch.ones_like(p)
        torch.optim.Adam([p], lr=1e-3, fused=True).step()
        return True
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False


def finetune(pretrained, task, *, seeds, wrapper=None, rank=4, alpha=8, layer_kwargs=None, **kw):
    """Fine-tune copies of ``pretrained`` (every weight if ``wrapper`` is None, else adapters),
    one per seed, at once. Seed k sets A's init and the batch order: configurations run with
    the same seeds are paired."""
    models = []
    for seed in seeds:
        seed_everything(seed)
        if wrapper is None:
            models.append(copy.deepcopy(pretrained).requires_grad_(True))
        else:
            models.append(add_adapters(pretrained, wrapper, rank, alpha, **(layer_kwargs or {})))
    return train(models, task, seeds=seeds, **kw)
