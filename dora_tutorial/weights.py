"""How fine-tuning moves the weights, the DoRA paper's Figure 2 as a test: direction and
magnitude change per layer, their slopes and correlations over seeds, and the verdicts."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dora_tutorial.adapter_files import adapter_layers
from dora_tutorial.models import layer_weights
from dora_tutorial.runtime import wrap
from dora_tutorial.stats import LEVEL, mean_interval
from dora_tutorial.training import Runs


def relative_change(weight: torch.Tensor, weight0: torch.Tensor) -> dict[str, float]:
    """Figure 2's measures of one fine-tuned weight against the pretrained one, over rows n:

    dD         = mean_n ( 1 - cos(W[n], W0[n]) )                (the paper's direction change)
    dM         = mean_n | ||W[n]|| - ||W0[n]|| | / ||W0[n]||     (magnitude change, relative)
    orthogonal = mean_n ( dD_n / (1 - dD_n) )                    (the dM of orthogonal updates)

    ``orthogonal`` is the relative magnitude change the same per-row direction changes give when
    each row's update d is orthogonal to the row: ||w0 + d|| = ||w0|| / cos. Only an update with
    a component along W0[n] moves a point off that curve. (A rotation keeps the length: dM = 0.)
    A row turned by 90 degrees or more has no such update: it counts in dD and dM, is left out
    of ``orthogonal`` (NaN if every row is) and is counted in ``turned``."""
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
        # dD_n / (1 - dD_n) = 1 / cos_n - 1, over the rows an orthogonal update can reach
        "orthogonal": (1 / cos[reachable] - 1).mean().item() if reachable.any() else math.nan,
        "turned": int((~reachable).sum()),
    }


def figure2_points(runs: Runs, pretrained: nn.Module, layers) -> list[dict]:
    """One point per (seed, checkpoint, layer): ``relative_change``'s dD, dM and orthogonal, with
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


def _orthogonal_slope(points: list[dict]) -> float:
    """The slope of the orthogonal-update reference on dD, over the points that have one."""
    have = [p for p in points if math.isfinite(p["orthogonal"])]
    if len(have) < 3:
        return math.nan
    return _least_squares([p["dD"] for p in have], [p["orthogonal"] for p in have])[0]


def figure2_slopes(points: list[dict], checkpoint: int | None = None) -> dict:
    """Per seed, the least-squares slope (with intercept) of relative dM on dD over its layers
    (at one ``checkpoint``, or over all of them); their mean and 95 % t-interval over seeds.

    With an intercept, the slope says how much more a layer's magnitude changes where its
    direction changes more; a magnitude change that happens whatever the direction change goes
    into the intercept. The same fit on the orthogonal-update reference gives the slope such
    updates would have over the same dD values (about 1 for small dD). Seeds are the replicates.

    Returns {"seeds", "slope", "intercept", "orthogonal" (per seed), "mean", "low", "high",
    "orthogonal_mean"}."""
    if checkpoint is not None:
        points = [p for p in points if p["checkpoint"] == checkpoint]
    seeds = _by_seed(points)
    fits = [_least_squares([p["dD"] for p in s], [p["dM"] for p in s]) for s in seeds.values()]
    orthogonal = [_orthogonal_slope(s) for s in seeds.values()]
    slope = np.array([f[0] for f in fits])
    low, high = mean_interval(slope)
    return {
        "seeds": list(seeds),
        "slope": slope.tolist(),
        "intercept": [f[1] for f in fits],
        "orthogonal": orthogonal,
        "mean": float(slope.mean()),
        "low": float(low),
        "high": float(high),
        "orthogonal_mean": float(np.nanmean(orthogonal))
        if np.isfinite(orthogonal).any()
        else math.nan,
    }


def slope_ratio(points_a, points_b, paired: bool | None = None, checkpoint=None) -> dict:
    """Slope of A over slope of B (``figure2_slopes``), with its 95 % interval.

    Paired by seed when both ran the same seeds (``paired=None`` decides): the per-seed
    log-ratio is tested with a one-sample t, and its mean and interval exponentiated (a
    geometric-mean ratio, symmetric in A and B). Unpaired: Welch's interval on the difference of
    mean log-slopes. A slope that is not positive has no log: then the per-seed ratios'
    arithmetic mean (paired only).

    Returns {"ratio", "low", "high", "paired", "scale" ("log" or "linear"), "n", "per_seed"}."""
    from scipy import stats

    a, b = figure2_slopes(points_a, checkpoint), figure2_slopes(points_b, checkpoint)
    same = a["seeds"] == b["seeds"]
    if paired is None:
        paired = same
    elif paired and not same:
        raise ValueError(f"pairing needs the same seeds, got {a['seeds']} and {b['seeds']}")
    sa, sb = np.array(a["slope"]), np.array(b["slope"])
    positive = (sa > 0).all() and (sb > 0).all()
    per_seed = (sa / sb).tolist() if paired else None
    if paired and positive:
        low, high = mean_interval(np.log(sa / sb))
        ratio, scale = float(np.exp(np.log(sa / sb).mean())), "log"
        low, high = math.exp(low), math.exp(high)
    elif paired:
        ratio, scale = float((sa / sb).mean()), "linear"
        low, high = mean_interval(sa / sb)
    elif positive:
        la, lb = np.log(sa), np.log(sb)
        va, vb = la.var(ddof=1) / len(la), lb.var(ddof=1) / len(lb)
        df = (va + vb) ** 2 / (va**2 / (len(la) - 1) + vb**2 / (len(lb) - 1))
        half = stats.t.ppf(0.5 + LEVEL / 2, df) * math.sqrt(va + vb)
        diff, scale = la.mean() - lb.mean(), "log"
        ratio, low, high = math.exp(diff), math.exp(diff - half), math.exp(diff + half)
    else:
        raise ValueError("an unpaired ratio needs positive slopes")
    return {
        "ratio": float(ratio),
        "low": float(low),
        "high": float(high),
        "paired": paired,
        "scale": scale,
        "n": min(len(sa), len(sb)),
        "per_seed": per_seed,
    }


def checkpoint_correlations(points: list[dict]) -> dict[int, dict]:
    """The correlation of relative dM with dD across layers, at each checkpoint on its own.

    Per seed and checkpoint, Pearson's r over that checkpoint's layers (pooling checkpoints
    would add the training-time trend: both measures grow as training goes on); then, per
    checkpoint, the mean over seeds and its 95 % interval, on Fisher's z = atanh(r).

    Returns {checkpoint: {"r" (per seed), "mean", "low", "high"}}."""
    out = {}
    for checkpoint in sorted({p["checkpoint"] for p in points}):
        rs = []
        for seed_points in _by_seed(points).values():
            here = [p for p in seed_points if p["checkpoint"] == checkpoint]
            if len(here) < 3:
                raise ValueError(f"checkpoint {checkpoint}: a correlation needs 3 or more layers")
            rs.append(float(np.corrcoef([p["dD"] for p in here], [p["dM"] for p in here])[0, 1]))
        z = np.arctanh(np.clip(rs, -1 + 1e-12, 1 - 1e-12))
        low, high = mean_interval(z)
        out[checkpoint] = {
            "r": [float(r) for r in rs],
            "mean": float(np.tanh(z.mean())),
            "low": float(np.tanh(low)),
            "high": float(np.tanh(high)),
        }
    return out


def figure2_analysis(points: dict[str, list[dict]], paper: dict[str, float]) -> dict:
    """Per method its slope at each checkpoint and its correlation at each checkpoint (with the
    paper's r); at the last checkpoint the slope ratios DoRA / LoRA, DoRA / full FT and
    LoRA / full FT (paired by seed); and the conclusions in words (``figure2_conclusions``)."""
    out: dict = {"methods": {}, "ratios": {}}
    for name, pts in points.items():
        checkpoints = sorted({p["checkpoint"] for p in pts})
        out["methods"][name] = {
            "slopes": {str(c): figure2_slopes(pts, c) for c in checkpoints},
            "correlations": {str(c): v for c, v in checkpoint_correlations(pts).items()},
            "paper_r": paper.get(name),
            "turned": sum(p.get("turned", 0) for p in pts),  # rows turned by 90 degrees or more
        }
    last = max(p["checkpoint"] for pts in points.values() for p in pts)
    for a, b in (("DoRA", "LoRA"), ("DoRA", "full FT"), ("LoRA", "full FT")):
        if {a, b} <= set(points):
            out["ratios"][f"{a} / {b}"] = slope_ratio(points[a], points[b], checkpoint=last)
    if {"full FT", "DoRA", "LoRA"} <= set(points):
        out["closer"] = closer_to_full_ft(out)
    out["conclusions"] = figure2_conclusions(out)
    return out


def figure2_conclusions(analysis: dict) -> dict[str, str]:
    """The analysis in three computed sentences: full fine-tuning's pattern against the paper's;
    whether DoRA's magnitude follows its direction less than LoRA's; and whether DoRA moves the
    weights more like full fine-tuning than LoRA does (the paper's claim), on these slopes."""
    methods, ratios, said = analysis["methods"], analysis["ratios"], {}
    if "full FT" in methods:
        corr = methods["full FT"]["correlations"].values()
        rs = ", ".join(f"{c['mean']:+.2f}" for c in corr)
        if all(c["low"] > 0 for c in corr):
            pattern = "every interval above 0: not the paper's negative pattern"
        elif all(c["high"] < 0 for c in corr):
            pattern = "every interval below 0: the paper's negative pattern"
        else:
            pattern = "the intervals disagree or cover 0: not settled"
        said["full FT pattern"] = (
            f"Full fine-tuning: r across layers {rs} at the checkpoints, {pattern} "
            f"(paper {methods['full FT']['paper_r']:+.2f})."
        )
    if "DoRA / LoRA" in ratios:
        r = ratios["DoRA / LoRA"]
        if r["high"] < 1 or r["low"] > 1:
            how = f"{'less' if r['high'] < 1 else 'more'} than LoRA's"
        else:
            how = "no differently from LoRA's, as far as these seeds tell"
        said["DoRA decoupled vs LoRA"] = (
            f"DoRA's length follows its direction {how} (slope ratio {_ratio(r)} at the last "
            "checkpoint); by construction, since m alone sets each row's length."
        )
    if {"DoRA / full FT", "LoRA / full FT"} <= set(ratios):
        d, lo = ratios["DoRA / full FT"], ratios["LoRA / full FT"]
        gap = analysis["closer"]
        closer = closer_method(gap)
        if closer:
            verdict = f"{closer} moves the weights more like full fine-tuning" + (
                ", as the paper reports" if closer == "DoRA" else ", not DoRA as the paper reports"
            )
        else:
            verdict = "the seeds cannot tell whether DoRA or LoRA is closer to full fine-tuning"
        said["closer to full FT"] = (
            f"Against full fine-tuning's slope, DoRA's is {_ratio(d)} and LoRA's {_ratio(lo)}; "
            f"DoRA's distance from it minus LoRA's, {gap['scale']}, paired by seed: "
            f"{gap['mean']:+.2f} [{gap['low']:+.2f}, {gap['high']:+.2f}]. On this measure "
            f"{verdict}."
        )
    return said


def closer_to_full_ft(analysis: dict) -> dict:
    """Per seed at the last checkpoint, how much farther DoRA's slope lies from full
    fine-tuning's than LoRA's does: |log(DoRA / full FT)| - |log(LoRA / full FT)| (ratios are
    multiplicative: half and twice are equally far), or |ratio - 1| when a slope is not
    positive; the mean and its 95 % interval over seeds. Below 0: DoRA is closer."""
    methods = analysis["methods"]
    last = list(methods["full FT"]["slopes"])[-1]
    ft, dora, lora = (
        np.array(methods[m]["slopes"][last]["slope"]) for m in ("full FT", "DoRA", "LoRA")
    )
    if (ft > 0).all() and (dora > 0).all() and (lora > 0).all():
        gap, scale = np.abs(np.log(dora / ft)) - np.abs(np.log(lora / ft)), "on the log scale"
    else:
        gap, scale = np.abs(dora / ft - 1) - np.abs(lora / ft - 1), "as |ratio - 1|"
    low, high = mean_interval(gap)
    return {"mean": float(gap.mean()), "low": float(low), "high": float(high), "scale": scale}


def closer_method(gap: dict) -> str | None:
    """'DoRA' or 'LoRA', whichever ``closer_to_full_ft``'s interval shows nearer full
    fine-tuning; None when the interval covers 0."""
    return "DoRA" if gap["high"] < 0 else "LoRA" if gap["low"] > 0 else None


def _ratio(r: dict) -> str:
    return f"{r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"


def figure2_table(analysis: dict) -> str:
    """``figure2_analysis``'s numbers: per method the slope at each checkpoint [95 % CI], the
    orthogonal-update slope (last checkpoint) and the paper's r; then r across layers at each
    checkpoint; then the slope ratios."""
    methods = analysis["methods"]
    checkpoints = list(next(iter(methods.values()))["slopes"])
    head = "".join(f"{'slope at ' + c:>18}" for c in checkpoints)
    lines = [f"{'method':<9}{head}{'orthogonal':>11}{'paper r':>8}"]
    for name, m in methods.items():
        paper = f"{m['paper_r']:+.2f}" if m["paper_r"] is not None else "-"
        cells = "".join(f"{_bracket(s, '.2f'):>18}" for s in m["slopes"].values())
        orthogonal = m["slopes"][checkpoints[-1]]["orthogonal_mean"]
        lines.append(f"{name:<9}{cells}{orthogonal:>11.2f}{paper:>8}")
    lines += ["", f"{'method':<9}" + "".join(f"{'r at ' + c:>21}" for c in checkpoints)]
    for name, m in methods.items():
        lines.append(
            f"{name:<9}" + "".join(f"{_bracket(v, '+.2f'):>21}" for v in m["correlations"].values())
        )
    if analysis["ratios"]:
        lines += ["", "slope ratio at the last checkpoint, paired by seed [95 % CI]:"]
        lines += [f"  {k:<16}{_ratio(r)}" for k, r in analysis["ratios"].items()]
    turned = {name: m["turned"] for name, m in methods.items() if m.get("turned")}
    if turned:
        counts = ", ".join(f"{name} {n:,}" for name, n in turned.items())
        lines.append(
            wrap(
                f"rows turned by 90 degrees or more, over all seeds, layers and checkpoints: "
                f"{counts} (in dD and dM; no orthogonal update reaches them)"
            )
        )
    return "\n".join(lines)


def _bracket(v: dict, spec: str) -> str:
    """'mean [low, high]' of a dict with those keys."""
    return f"{v['mean']:{spec}} [{v['low']:{spec}}, {v['high']:{spec}}]"


def magnitude_moved(model, weights0):
    """Per DoRA layer of ``model``: how far m moved from ||W0[n]||, as the mean over rows of
    |m_n / ||W0[n]|| - 1|, in percent (``weights0``: the pretrained weights by layer name)."""
    return {
        name: 100 * (layer.m.detach() / weights0[name].norm(dim=1) - 1).abs().mean().item()
        for name, layer in adapter_layers(model).items()
    }


def magnitude_table(moved: list[dict[str, float]], weights0) -> str:
    """``magnitude_moved`` of every seed as a table: per layer, seed 0, the mean ± std over
    seeds and the least."""
    lines = [
        "How far m moved from ||W0[n]||: the mean over rows of |m_n / ||W0[n]|| - 1|, in %",
        f"{'layer':<7}{'out x in':>10}{'seed 0':>9}"
        f"{f'{len(moved)} seeds: mean ± std':>26}{'least':>8}",
    ]
    for name in moved[0]:
        per_seed = np.array([m[name] for m in moved])
        shape = "x".join(map(str, weights0[name].shape))
        lines.append(
            f"{name:<7}{shape:>10}{per_seed[0]:>9.2f}{per_seed.mean():>17.2f} ± "
            f"{per_seed.std(ddof=1):<6.2f}{per_seed.min():>8.2f}"
        )
    return "\n".join(lines)
