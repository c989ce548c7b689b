"""Training speed: a batched step against its matmuls, seeds together, the data pipeline.
What each subcommand measures: benchmarks/README.md."""

import argparse
from functools import reduce
from itertools import pairwise

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import helpers
from benchmarks.common import interleaved, ratio_rows, setup, table
from dora_tutorial.notebook import protocol
from experiments.common import tasks

STEPS = 20  # batches per timed epoch of ``step``


def methods(nb) -> dict:
    return {cls.__name__: cls for cls in (nb.LinearWithLoRA, nb.LinearWithDoRA, nb.DoRALinear)}


def finetune(nb, pretrained, task, wrapper, seeds):
    kw = dict(rank=nb.RANK, alpha=nb.ALPHA, lr=1e-3, epochs=1, batch_size=nb.BATCH_SIZE, log=None)
    return helpers.finetune(pretrained, task, seeds=seeds, wrapper=wrapper, **kw)


def step(nb, device, repeats, seeds=tuple(range(10))) -> None:
    sizes, batch, n = tuple(nb.SIZES), nb.BATCH_SIZE, STEPS * nb.BATCH_SIZE
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, sizes[0], generator=g).to(device)
    y = torch.randint(0, sizes[-1], (n,), generator=g).to(device)
    task = helpers.Task(x, y, x[:batch], y[:batch])  # a small test set: evaluation is not timed
    pretrained = helpers.make_mlp(sizes, seed=0)
    forward = [torch.randn(len(seeds), i, o, generator=g).to(device) for i, o in pairwise(sizes)]
    chain = [*forward, *(w.transpose(1, 2).contiguous() for w in reversed(forward[1:]))]
    inputs = torch.randn(len(seeds), batch, sizes[0], generator=g).to(device)

    def products():
        return [reduce(torch.bmm, chain, inputs) for _ in range(STEPS)]

    cases = {"floor": lambda: helpers.timed(products, device)[0]}
    for name, wrapper in methods(nb).items():
        cases[name] = lambda w=wrapper: finetune(nb, pretrained, task, w, seeds).seconds[0]
    per_step = {k: s / STEPS for k, s in interleaved(cases, repeats or 7).items()}
    print(f"\n{len(seeds)} seeds, batch {batch}; goals: x floor <= 2, DoRA x LoRA <= 1.15")
    label = f"MLP {'-'.join(map(str, sizes))}, r={nb.RANK}"
    rows = ratio_rows(label, per_step, "floor", "LinearWithLoRA")
    table(["configuration", "layer", "ms / step", "x floor", "x LoRA"], rows)


def seeds(nb, device, repeats) -> None:
    mnist, rotated = tasks(protocol(nb), device)
    pretrained = helpers.make_mlp(nb.SIZES, seed=0)
    nb.train_one_model(pretrained, mnist, nb.PRETRAIN_EPOCHS, nb.PRETRAIN_LR, nb.BATCH_SIZE)

    def seconds(wrapper, seeds) -> float:
        return helpers.timed(lambda: finetune(nb, pretrained, rotated, wrapper, seeds), device)[0]

    rows = []
    for name, wrapper in {"full FT": None, **methods(nb)}.items():
        seconds(wrapper, (0,))  # warm-up
        for count in (1, 3, 10):
            solo = sum(seconds(wrapper, (k,)) for k in range(count))
            together = seconds(wrapper, range(count))
            rows.append([name, count, f"{solo:.2f}", f"{together:.2f}", f"{together / solo:.2f}"])
    print(f"\none epoch of {nb.FT_TRAIN_SIZE:,} examples")
    table(["method", "seeds", "one by one s", "together s", "together / one by one"], rows)


def pipeline(nb, device, repeats) -> None:
    task = helpers.make_task(*helpers.load_mnist(verbose=False), device=device)
    data = datasets.MNIST(helpers.REPO / "data", transform=transforms.ToTensor())  # verified above

    def tutorial() -> None:  # batches from a DataLoader, moved to the device one by one
        model = nn.Sequential(nn.Flatten(), *helpers.make_mlp(nb.SIZES, seed=0)).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for x, y in DataLoader(data, batch_size=64, shuffle=True):
            nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():  # the accuracy pass
            for x, y in DataLoader(data, batch_size=64):
                (model(x.to(device)).argmax(1) == y.to(device)).sum().item()

    def project(batch_size: int) -> None:
        model = helpers.make_mlp(nb.SIZES, seed=0).to(device)
        helpers.train(model, task, epochs=1, lr=1e-3, batch_size=batch_size, log=None)
        helpers.accuracy(model, task.train_x, task.train_y)

    cases = {"tutorial DataLoader, batch 64": tutorial}
    for b in (64, 128):
        cases[f"one tensor on the device, batch {b}"] = lambda b=b: project(b)
    timed = {name: lambda f=f: helpers.timed(f, device)[0] for name, f in cases.items()}
    seconds = interleaved(timed, repeats or 3)
    rows = ratio_rows("epoch + accuracy pass", seconds, "tutorial DataLoader, batch 64")
    table(["timed", "pipeline", "ms / epoch", "x tutorial"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["step", "seeds", "pipeline"])
    parser.add_argument("--repeats", type=int, help="timed rounds: step 7, pipeline 3")
    args = parser.parse_args()
    {"step": step, "seeds": seeds, "pipeline": pipeline}[args.which](*setup(), args.repeats)


if __name__ == "__main__":
    main()
