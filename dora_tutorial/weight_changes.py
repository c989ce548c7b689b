"""How fine-tuning moves the weights (the DoRA paper's Figure 2, as a test): direction and
magnitude change per layer, their slopes and correlations over seeds, and the verdicts."""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dora_tutorial.adapter_files import adapter_layers
from dora_tutorial.models import layer_weights
from dora_tutorial.stats import mean_interval
from dora_tutorial.training import Runs


def relative_change(weight: torch.Tensor, weight0: torch.Tensor) -> dict[str, float]:
    """Figure 2's measures of one fine-tuned weight against the pretrained one, over rows n:

    dD = mean_n (1 - cos(W[n], W0[n])), dM = mean_n | ||W[n]|| - ||W0[n]|| | / ||W0[n]||, and
    orthogonal = mean_n dD_n / (1 - dD_n), the dM of updates orthogonal to their rows
    (||w0 + d|| = ||w0|| / cos); a rotation has dM = 0. No such update turns a row by 90
    degrees or more: those rows count in dD and dM, not in ``orthogonal``."""
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
        # dD_n / (1 - dD_n) = 1 / cos_n - 1
        "orthogonal": (1 / cos[reachable] - 1).mean().item() if reachable.any() else math.nan,
    }


def figure2_points(runs: Runs, pretrained: nn.Module, layers) -> list[dict]:
    """One point per (seed, checkpoint: the epoch recorded after, layer) with
    ``relative_change``'s measures, from runs trained with ``record_weights=True``."""
    if not runs.weights:
        raise ValueError("these runs recorded no weights: train them with record_weights=True")
    weights0 = layer_weights(pretrained)
    missing = [layer for layer in layers if layer not in weights0]
    if missing:
        raise ValueError(f"no layer named {missing} in the model (it has {list(weights0)})")
    return [
        dict(seed=seed, checkpoint=epoch, layer=layer, **relative_change(w[layer], weights0[layer]))
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


def _interval(values: np.ndarray, back=float) -> dict:
    """The mean of ``values`` and its 95 % interval, each mapped back by ``back``."""
    low, high = mean_interval(values)
    return {"mean": float(back(values.mean())), "low": float(back(low)), "high": float(back(high))}


def _least_squares(points: list[dict], y: str) -> tuple[float, float]:
    """(slope, intercept) of ``y`` on dD by least squares."""
    x, y = (np.array([p[k] for p in points], dtype=float) for k in ("dD", y))
    if len(x) < 3 or np.ptp(x) == 0:
        raise ValueError("a slope needs at least 3 points with different dD")
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def figure2_slopes(points: list[dict], checkpoint: int | None = None) -> dict:
    """Per seed, the slope of relative dM on dD over its layers (at ``checkpoint``, or over
    all), with an intercept: a magnitude change whatever the direction change is not counted.
    Their mean and 95 % interval, and the same fit of the orthogonal-update reference."""
    if checkpoint is not None:
        points = [p for p in points if p["checkpoint"] == checkpoint]
    seeds = _by_seed(points)
    fits = np.array([_least_squares(s, "dM") for s in seeds.values()])
    finite = ([p for p in s if math.isfinite(p["orthogonal"])] for s in seeds.values())
    orthogonal = [_least_squares(f, "orthogonal")[0] for f in finite if len(f) >= 3]
    return {
        "seeds": list(seeds),
        "slope": fits[:, 0].tolist(),
        "intercept": fits[:, 1].tolist(),
        **_interval(fits[:, 0]),
        "orthogonal_mean": float(np.mean(orthogonal)) if orthogonal else math.nan,
    }


def slope_ratio(points_a, points_b, checkpoint=None) -> dict:
    """Slope of A over slope of B (``figure2_slopes``), paired by seed, with its 95 % interval:
    the per-seed log-ratio's mean and t-interval, exponentiated (a geometric-mean ratio,
    symmetric in A and B); the per-seed ratios' plain mean where a slope is not positive."""
    a, b = figure2_slopes(points_a, checkpoint), figure2_slopes(points_b, checkpoint)
    if a["seeds"] != b["seeds"]:
        raise ValueError(f"pairing needs the same seeds, got {a['seeds']} and {b['seeds']}")
    ratios = np.array(a["slope"]) / np.array(b["slope"])
    log = min(a["slope"] + b["slope"]) > 0
    v = _interval(np.log(ratios), np.exp) if log else _interval(ratios)
    v["ratio"] = v.pop("mean")
    return {**v, "scale": "log" if log else "linear", "n": len(ratios), "per_seed": ratios.tolist()}


def checkpoint_correlations(points: list[dict]) -> dict[int, dict]:
    """Per seed, Pearson's r of relative dM with dD across layers, at each checkpoint on its
    own (both grow over training: pooling would add that trend); the mean and 95 % interval
    over seeds, on Fisher's z = atanh r."""
    out, seeds = {}, _by_seed(points).values()
    for checkpoint in sorted({p["checkpoint"] for p in points}):
        rs = []
        for seed_points in seeds:
            here = [p for p in seed_points if p["checkpoint"] == checkpoint]
            if len(here) < 3:
                raise ValueError(f"checkpoint {checkpoint}: a correlation needs 3 or more layers")
            rs.append(float(np.corrcoef([p["dD"] for p in here], [p["dM"] for p in here])[0, 1]))
        z = np.arctanh(np.clip(rs, -1 + 1e-12, 1 - 1e-12))
        out[checkpoint] = {"r": rs, **_interval(z, np.tanh)}
    return out


def figure2_analysis(points: dict[str, list[dict]], paper: dict[str, float]) -> dict:
    """Per method the slope and correlation at each checkpoint; at the last one the slope
    ratios, which of DoRA and LoRA is closer to full FT, and the conclusions in words."""
    out: dict = {"methods": {}, "ratios": {}}
    for name, pts in points.items():
        checkpoints = sorted({p["checkpoint"] for p in pts})
        out["methods"][name] = {
            "slopes": {str(c): figure2_slopes(pts, c) for c in checkpoints},
            "correlations": {str(c): v for c, v in checkpoint_correlations(pts).items()},
            "paper_r": paper.get(name),
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
    """Full fine-tuning's pattern against the paper's; whether DoRA's magnitude follows its
    direction less than LoRA's; which moves the weights more like full FT (the paper: DoRA)."""
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
            f"DoRA's length follows its direction {how} (slope ratio "
            f"{_bracket(r, key='ratio')} at the last checkpoint); by construction, since m alone "
            "sets each row's length."
        )
    if "closer" in analysis:
        gap, closer = analysis["closer"], closer_method(analysis["closer"])
        d, lo = (_bracket(ratios[f"{m} / full FT"], key="ratio") for m in ("DoRA", "LoRA"))
        verdict = "the seeds cannot tell whether DoRA or LoRA is closer to full fine-tuning"
        if closer:
            paper = "as the paper reports" if closer == "DoRA" else "not DoRA as the paper reports"
            verdict = f"{closer} moves the weights more like full fine-tuning, {paper}"
        said["closer to full FT"] = (
            f"Against full fine-tuning's slope, DoRA's is {d} and LoRA's {lo}; DoRA's distance "
            "from it minus LoRA's, "
            f"{gap['scale']}, paired by seed: {_bracket(gap, '+.2f')}. On this measure {verdict}."
        )
    return said


def closer_to_full_ft(analysis: dict) -> dict:
    """Per seed at the last checkpoint, |log(DoRA / full FT)| - |log(LoRA / full FT)| of the
    slopes (half and twice are equally far), or |ratio - 1| when a slope is not positive; its
    mean and 95 % interval over seeds. Below 0: DoRA's slope is closer to full FT's."""
    dora, lora = (analysis["ratios"][f"{m} / full FT"] for m in ("DoRA", "LoRA"))
    d, lo = np.array(dora["per_seed"]), np.array(lora["per_seed"])
    if dora["scale"] == lora["scale"] == "log":  # every slope positive
        gap, scale = np.abs(np.log(d)) - np.abs(np.log(lo)), "on the log scale"
    else:
        gap, scale = np.abs(d - 1) - np.abs(lo - 1), "as |ratio - 1|"
    return {**_interval(gap), "scale": scale}


def closer_method(gap: dict) -> str | None:
    """'DoRA' or 'LoRA', whichever ``closer_to_full_ft``'s interval favours; None if neither."""
    return "DoRA" if gap["high"] < 0 else "LoRA" if gap["low"] > 0 else None


def _bracket(v: dict, spec: str = ".2f", key: str = "mean") -> str:
    return f"{v[key]:{spec}} [{v['low']:{spec}}, {v['high']:{spec}}]"


def figure2_table(analysis: dict) -> str:
    """``figure2_analysis``'s numbers as the notebook prints them."""
    methods = analysis["methods"]
    checkpoints = list(next(iter(methods.values()))["slopes"])
    head = "".join(f"{'slope at ' + c:>19}" for c in checkpoints)
    lines = [f"{'method':<8}{head}{'orthogonal':>11}"]
    for name, m in methods.items():
        cells = "".join(f"{_bracket(s):>19}" for s in m["slopes"].values())
        lines.append(f"{name:<8}{cells}{m['slopes'][checkpoints[-1]]['orthogonal_mean']:>11.2f}")
    head = "".join(f"{'r at ' + c:>21}" for c in checkpoints)
    lines += ["", f"{'method':<8}{head}{'paper r':>8}"]
    for name, m in methods.items():
        paper = f"{m['paper_r']:+.2f}" if m["paper_r"] is not None else "-"
        cells = "".join(f"{_bracket(v, '+.2f'):>21}" for v in m["correlations"].values())
        lines.append(f"{name:<8}{cells}{paper:>8}")
    if analysis["ratios"]:
        lines += ["", "slope ratio at the last checkpoint, paired by seed [95 % CI]:"]
        lines += [f"  {k:<16}{_bracket(r, key='ratio')}" for k, r in analysis["ratios"].items()]
    return "\n".join(lines)


def magnitude_moved(model, weights0):
    """Per DoRA layer of ``model``, in percent: the mean over rows of |m_n / ||W0[n]|| - 1|
    (``weights0``: the pretrained weights by layer name)."""
    return {
        name: 100 * (layer.m.detach() / weights0[name].norm(dim=1) - 1).abs().mean().item()
        for name, layer in adapter_layers(model).items()
    }


def magnitude_table(moved: list[dict[str, float]], weights0) -> str:
    """``magnitude_moved`` of every seed: per layer, seed 0, mean ± std over seeds, the least."""
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
