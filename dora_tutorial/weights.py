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
from dora_tutorial.session import wrap
from dora_tutorial.stats import LEVEL, mean_interval
from dora_tutorial.training import Runs


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
    low, high = mean_interval(slope)
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
        low, high = mean_interval(z)
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


def magnitude_moved(model, weights0):
    """Per DoRA layer of ``model``: how far m moved from ||W0[n]||, as the mean over rows of
    |m_n / ||W0[n]|| - 1|, in percent (``weights0``: the pretrained weights by layer name)."""
    return {
        name: 100 * (layer.m.detach() / weights0[name].norm(dim=1) - 1).abs().mean().item()
        for name, layer in adapter_layers(model).items()
    }
