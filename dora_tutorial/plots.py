"""The notebook's figures. Each draws only the numbers it is given, at a fixed size: nbval
compares their text."""

import matplotlib.pyplot as plt
import numpy as np
import torch

from dora_tutorial.stats import mean_interval
from dora_tutorial.training import Runs
from dora_tutorial.weight_changes import figure2_slopes


def plot_digits(images: torch.Tensor, rotated: torch.Tensor, labels: torch.Tensor):
    """Two rows of digits: as pretrained on (top) and as fine-tuned on (bottom)."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.1 * n, 2.8))
    for i in range(n):
        for row, batch in enumerate((images, rotated)):
            axes[row, i].imshow(batch[i].cpu().numpy(), cmap="gray_r")
            axes[row, i].set(xticks=[], yticks=[])
        axes[0, i].set_title(str(int(labels[i])))
    axes[0, 0].set_ylabel("MNIST")
    axes[1, 0].set_ylabel("rotated")
    fig.suptitle("The same test digits, upright and rotated")
    fig.tight_layout()
    return fig


def plot_idea():
    """One weight row w0 in two dimensions, as a length and a direction: a rank-1 update (LoRA)
    moves it along one line, so length and angle change together; DoRA takes the direction of
    a point on that line, V / ||V||, and gives it a length m of its own."""
    w0 = torch.tensor([1.0, 0.35])
    unit = w0 / w0.norm()
    across = torch.tensor([-unit[1], unit[0]])  # perpendicular to w0
    d = across + 0.3 * unit  # the update's direction b a: mostly across w0
    lora = [w0 + t * d for t in (-0.6, -0.3, 0.3, 0.6)]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), sharex=True, sharey=True)

    def arrows(ax, vectors, color, label=None, alpha=1.0, lw=2):
        style = {"arrowstyle": "->", "color": color, "lw": lw, "alpha": alpha}
        for v in vectors:
            ax.annotate("", xy=tuple(v.tolist()), xytext=(0, 0), arrowprops=style)
        if label:  # an annotation has no legend entry: an empty line of the same style has
            ax.plot([], [], color=color, lw=lw, alpha=alpha, label=label)

    arrows(axes[0], [w0], "C0", f"w0, length ||w0|| = {w0.norm():.2f}")
    arrows(axes[0], [0.5 * unit], "C3", "its direction w0 / ||w0||\n(drawn at length 0.5)")
    axes[0].set_title("a weight row: a length and a direction")
    line = torch.stack([w0 - 0.8 * d, w0 + 0.8 * d])
    for ax in axes[1:]:
        ax.plot(line[:, 0], line[:, 1], ls=":", color="C1")
        arrows(ax, [w0], "C0", "w0")
    updates = "w0 + updates along one line:\nlength and angle change together"
    arrows(axes[1], lora, "C1", updates, alpha=0.7)
    axes[1].set_title("LoRA: w0 + a rank-1 update")
    direction = lora[-1] / lora[-1].norm()
    # wide, under the m V / ||V|| on its ray
    arrows(axes[2], [lora[-1]], "C1", "V = w0 + one of those updates", alpha=0.4, lw=7)
    lengths = torch.tensor([[0.6], [0.9], [1.2], [1.5]])
    arrows(axes[2], lengths * direction, "C2", "m V / ||V||: V's direction,\nany length m")
    axes[2].set_title("DoRA: V's direction, a length m")
    for ax in axes:
        ax.axhline(0, color="0.85", lw=0.8)
        ax.axvline(0, color="0.85", lw=0.8)
        ax.set(aspect="equal", xlim=(-0.3, 1.8), ylim=(-0.6, 1.9))  # legends above the line
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_methods(results: dict[str, Runs], start: float, title: str, pair=("DoRA", "LoRA")):
    """Left: each method's mean test accuracy per epoch from ``start`` (the pretrained model's),
    with the 95 % interval over seeds. Right: the per-seed difference A - B of ``pair``, which
    shows how far apart two curves are where they coincide on the left."""
    fig, (ax_acc, ax_diff) = plt.subplots(1, 2, figsize=(10, 4.4))
    for i, (name, runs) in enumerate(results.items()):
        acc = np.concatenate([np.full((len(runs.seeds), 1), start), runs.test_acc], 1) * 100
        epochs = np.arange(acc.shape[1])
        low, high = np.array([mean_interval(acc[:, e]) for e in epochs[1:]]).T
        style = {"marker": "osD^v"[i % 5], "ls": "-" if i % 2 == 0 else "--"}  # none hidden
        ax_acc.plot(epochs, acc.mean(0), color=f"C{i}", label=name, **style)
        ax_acc.fill_between(epochs[1:], low, high, color=f"C{i}", alpha=0.2)
    diff = np.subtract(*(100 * results[name].test_acc for name in pair))
    epochs = np.arange(1, diff.shape[1] + 1)
    low, high = np.array([mean_interval(diff[:, e - 1]) for e in epochs]).T
    ax_diff.axhline(0, color="0.5", lw=1)
    ax_diff.plot(epochs, diff.mean(0), marker="o", color="C2", label=f"{pair[0]} - {pair[1]}")
    ax_diff.fill_between(epochs, low, high, color="C2", alpha=0.2, label="95 % interval")
    for ax in (ax_acc, ax_diff):
        ax.xaxis.get_major_locator().set_params(integer=True)  # no "epoch 2.5"
        ax.grid(alpha=0.3)
    ax_acc.set(xlabel="epoch (0: the pretrained model)", ylim=(start * 100 - 2, None))
    ax_acc.set_ylabel("test accuracy (%)")
    ax_diff.set(xlabel="epoch", ylabel="difference (points)")
    ax_diff.set(title=f"{pair[0]} - {pair[1]}: mean of the per-seed differences")
    ax_acc.legend(title=f"mean of {len(diff)} seeds", loc="lower right")
    ax_diff.legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_paired(pairs: dict[str, tuple[Runs, Runs]], title: str):
    """One row per comparison A - B: each seed's difference in final test accuracy (dots),
    their mean and its 95 % interval (bar); the dashed line is no difference."""
    fig, ax = plt.subplots(figsize=(8, 0.8 + 0.9 * len(pairs)))
    bar = {"fmt": "D", "color": "C3", "capsize": 4}
    for row, (runs_a, runs_b) in enumerate(reversed(pairs.values())):
        d = runs_a.final - runs_b.final
        low, high = mean_interval(d)
        lane = 0.08 * (np.argsort(np.argsort(d)) % 3 - 1)  # neighbours in value: other lanes
        ax.plot(d, row + 0.18 + lane, "o", color="0.55", ms=4)
        ax.errorbar(d.mean(), row - 0.12, xerr=[[d.mean() - low], [high - d.mean()]], **bar)
    ax.plot([], [], "o", color="0.55", ms=4, label="one seed")
    ax.errorbar([], [], xerr=[], **bar, label="mean, 95 % interval")
    ax.axvline(0, color="0.4", ls="--", lw=1)
    ax.set_yticks(range(len(pairs)), list(reversed(list(pairs))))
    ax.set(ylim=(-0.6, len(pairs) - 0.4), xlabel="difference in final test accuracy (points)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    fig.legend(loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def plot_rank_sweep(sweep: dict[tuple[str, int], Runs], reference: Runs, title: str):
    """Final accuracy (mean ± std) against rank and against trainable parameters."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, method in enumerate(dict.fromkeys(method for method, _ in sweep)):
        ranks = sorted(rank for m, rank in sweep if m == method)
        accs = [sweep[method, r].final for r in ranks]
        params = [sweep[method, r].trainable for r in ranks]
        mean, std = np.array([a.mean() for a in accs]), np.array([a.std(ddof=1) for a in accs])
        for ax, x in zip(axes, (ranks, params), strict=True):
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, color=f"C{i + 1}", label=method)
    ref, sd = reference.final.mean(), reference.final.std(ddof=1)
    for ax, xlabel in zip(axes, ("rank r", "trainable parameters"), strict=True):
        ax.axhline(ref, color="C0", label="full FT")
        ax.axhspan(ref - sd, ref + sd, color="C0", alpha=0.15)
        ax.set_xscale("log", base=2 if xlabel == "rank r" else 10)
        ax.set(xlabel=xlabel, ylabel="final test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_xticks(ranks, [str(r) for r in ranks])
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_figure2(points: dict[str, list[dict]], title: str):
    """Relative dM against dD of every seed, layer and checkpoint, one panel per method, with
    the orthogonal-update curve and the fitted line at the last checkpoint (mean over seeds)."""
    fig = plt.figure(figsize=(4 * len(points), 3.6), layout="constrained")
    axes = fig.subplots(1, len(points), sharex=True, sharey=True, squeeze=False)
    all_points = [p for pts in points.values() for p in pts]
    checkpoints = sorted({p["checkpoint"] for p in all_points})
    x = np.linspace(0, max(p["dD"] for p in all_points) * 1.05, 100)
    for ax, (method, pts) in zip(axes[0], points.items(), strict=True):
        later = sorted(pts, key=lambda p: p["checkpoint"])  # later checkpoints on top
        d_d, d_m, when = np.array([(p["dD"], p["dM"], p["checkpoint"]) for p in later]).T
        dots = ax.scatter(d_d, d_m, c=when, s=10, vmin=checkpoints[0], vmax=checkpoints[-1])
        ax.plot(x, x / (1 - x), color="k", ls="--", lw=1)
        s = figure2_slopes(pts, checkpoints[-1])
        ends = np.quantile(d_d[when == checkpoints[-1]], [0, 1])  # of the last checkpoint's dD
        ax.plot(ends, np.mean(s["intercept"]) + s["mean"] * ends, color="C3", lw=1.5)
        ax.set_title(f"{method}: slope {s['mean']:.2f}", fontsize=10)
        ax.set_xlabel("ΔD (direction change)")  # per panel: a figure's would lie under the legend
    fig.supylabel("ΔM / ||W0[n]|| (relative)", fontsize=10)
    handles, names = dots.legend_elements(fmt="checkpoint {x:.0f}")
    handles = [plt.Line2D([], [], color="k", ls="--"), plt.Line2D([], [], color="C3"), *handles]
    names = ["orthogonal update: ΔD / (1 - ΔD)", "fitted line, last checkpoint", *names]
    fig.legend(handles, names, loc="outside lower center", ncol=len(handles), fontsize=7)
    fig.suptitle(title)
    return fig


def plot_learning_rates(validation: dict[str, dict[str, float]], ranks, title: str):
    """Validation accuracy against learning rate, one panel per rank, from ``validation``:
    {"LoRA r4": {rate: accuracy}, ..., "full FT": {...}} (no rank: in every panel)."""
    fig, axes = plt.subplots(1, len(ranks), figsize=(4 * len(ranks), 3.4), sharey=True)
    for ax, rank in zip(np.atleast_1d(axes), ranks, strict=True):
        for i, method in enumerate(("full FT", "LoRA", "DoRA", "scaled LoRA")):
            scores = validation.get(method if method == "full FT" else f"{method} r{rank}")
            if scores:
                rates = sorted(scores, key=float)
                style = dict(color="0.6", ls=":") if method == "full FT" else dict(color=f"C{i}")
                x, y = [float(r) for r in rates], [scores[r] for r in rates]
                ax.plot(x, y, marker="o", ms=3, label=method, **style)
        ax.set_xscale("log")
        ax.set_title(f"rank {rank}", fontsize=10)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.supxlabel("learning rate", fontsize=10)
    fig.supylabel("validation accuracy (%)", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
