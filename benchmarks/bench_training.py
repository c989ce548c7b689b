"""Training speed: a batched step against its matmuls, seeds together, the data pipeline.

step: ten MLPs with the notebook's adapters trained at once (``helpers.finetune``) against the
step's large products alone (forward, and backward to each layer's input: the base is frozen).
seeds: S runs of one seed against one run of S seeds. pipeline: an MNIST epoch and accuracy pass
with a tutorial's ``DataLoader(transform=ToTensor())`` against one tensor on the device.
"""

import argparse
from functools import partial, reduce
from itertools import pairwise

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import helpers
from benchmarks.common import interleaved, ratio_rows, setup, table
from dora_tutorial.notebook import protocol
from experiments.common import tasks


def methods(nb) -> dict:
    return {cls.__name__: cls for cls in (nb.LinearWithLoRA, nb.LinearWithDoRA, nb.DoRALinear)}


def finetune(nb, pretrained, task, wrapper, seeds):
    kw = dict(rank=nb.RANK, alpha=nb.ALPHA, lr=1e-3, epochs=1, batch_size=nb.BATCH_SIZE, log=None)
    return helpers.finetune(pretrained, task, seeds=seeds, wrapper=wrapper, **kw)


def step(nb, device, args, seeds=tuple(range(10))) -> None:
    sizes, batch, n = tuple(nb.SIZES), nb.BATCH_SIZE, args.steps * nb.BATCH_SIZE
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, sizes[0], generator=g).to(device)
    y = torch.randint(0, sizes[-1], (n,), generator=g).to(device)
    task = helpers.Task(x, y, x[:batch], y[:batch])  # a small test set: evaluation is not timed
    pretrained = helpers.make_mlp(sizes, seed=0)
    forward = [torch.randn(len(seeds), i, o, generator=g).to(device) for i, o in pairwise(sizes)]
    chain = [*forward, *(w.transpose(1, 2).contiguous() for w in reversed(forward[1:]))]
    inputs = torch.randn(len(seeds), batch, sizes[0], generator=g).to(device)

    def products():
        for _ in range(args.steps):
            reduce(torch.bmm, chain, inputs)

    cases = {"floor": lambda: helpers.timed(products, device)[0]}
    for name, wrapper in methods(nb).items():
        cases[name] = lambda w=wrapper: finetune(nb, pretrained, task, w, seeds).seconds[0]
    per_step = {k: s / args.steps for k, s in interleaved(cases, args.repeats or 7).items()}
    print(f"\n{len(seeds)} seeds, batch {batch}; goals: x floor <= 2, DoRA x LoRA <= 1.15")
    label = f"MLP {'-'.join(map(str, sizes))}, r={nb.RANK}"
    table(
        ["configuration", "layer", "ms / step", "x floor", "x LoRA"],
        ratio_rows(label, per_step, "floor", "LinearWithLoRA"),
    )


def seeds(nb, device, args) -> None:
    p = protocol(nb)
    mnist, rotated = tasks(p, device)
    pretrained = helpers.make_mlp(nb.SIZES, seed=0)
    nb.train_one_model(pretrained, mnist, p["PRETRAIN_EPOCHS"], p["PRETRAIN_LR"], p["BATCH_SIZE"])

    def seconds(wrapper, seeds) -> float:
        return helpers.timed(lambda: finetune(nb, pretrained, rotated, wrapper, seeds), device)[0]

    rows = []
    for name, wrapper in {"full FT": None, **methods(nb)}.items():
        seconds(wrapper, (0,))  # warm-up
        for count in args.seeds:
            solo = sum(seconds(wrapper, (k,)) for k in range(count))
            together = seconds(wrapper, range(count))
            rows.append([name, count, f"{solo:.2f}", f"{together:.2f}", f"{together / solo:.2f}"])
    print(f"\none epoch of {nb.FT_TRAIN_SIZE:,} examples")
    table(["method", "seeds", "one by one s", "together s", "together / one by one"], rows)


def tutorial_epoch(data, sizes, device) -> None:
    model = nn.Sequential(nn.Flatten(), *helpers.make_mlp(sizes, seed=0)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x, y in DataLoader(data, batch_size=64, shuffle=True):
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        loader = DataLoader(data, batch_size=64)
        hits = sum((model(x.to(device)).argmax(1) == y.to(device)).sum().item() for x, y in loader)
    print(f"  tutorial: train accuracy {hits / len(data):.2%}")


def project_epoch(sizes, task, batch_size) -> None:
    model = helpers.make_mlp(sizes, seed=0).to(task.train_x.device)
    helpers.train(model, task, epochs=1, lr=1e-3, batch_size=batch_size, log=None)
    accuracy = helpers.accuracy(model, task.train_x, task.train_y)
    print(f"  project, batch {batch_size}: train accuracy {accuracy:.2%}")


def pipeline(nb, device, args) -> None:
    task = helpers.make_task(*helpers.load_mnist(verbose=False), device=device)
    data = datasets.MNIST(helpers.REPO / "data", download=True, transform=transforms.ToTensor())
    epochs = {"tutorial DataLoader, batch 64": partial(tutorial_epoch, data, nb.SIZES, device)}
    for b in (64, 128):
        epochs[f"one tensor on the device, batch {b}"] = partial(project_epoch, nb.SIZES, task, b)
    cases = {name: lambda f=f: helpers.timed(f, device)[0] for name, f in epochs.items()}
    seconds = interleaved(cases, args.repeats or 3)
    rows = ratio_rows("epoch + accuracy pass", seconds, "tutorial DataLoader, batch 64")
    table(["timed", "pipeline", "ms / epoch", "x tutorial"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["step", "seeds", "pipeline"])
    parser.add_argument("--repeats", type=int, help="timed rounds: step 7, pipeline 3")
    parser.add_argument("--steps", type=int, default=20, help="step: batches per timed epoch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 3, 10], help="seeds: S")
    args = parser.parse_args()
    {"step": step, "seeds": seeds, "pipeline": pipeline}[args.which](*setup(), args)


if __name__ == "__main__":
    main()
