"""Adapters as files: our format, and Hugging Face PEFT's names, options and directories.

``helpers`` imports what the notebook uses from here (sections 9 and 10). Nothing here defines
layer math: the adapter layers are the notebook's classes, and these functions only use what
every one of them has: ``linear`` (the frozen ``nn.Linear``), ``lora.A`` (rank, in),
``lora.B`` (out, rank), ``lora.scaling`` (alpha / rank), ``m`` (out,) for DoRA, and
``merged_weight()``. Convolution adapters (section 13) have ``conv`` (the frozen ``nn.Conv2d``)
instead of ``linear``, ``lora.A`` (rank, in / groups, kh, kw) and ``lora.B`` (out,
rank / groups, 1, 1).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from dora_tutorial.files import write_atomic, write_atomic_dir


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: layer} for every adapter layer (a module with ``merged_weight()``).

    Only the outermost such module counts; the model itself may be one (name "").
    """
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if callable(getattr(module, "merged_weight", None)) and not inside(name, found):
            found[name] = module
    return found


def inside(name: str, outer_names) -> bool:
    """Whether module ``name`` lies strictly inside one of ``outer_names`` ("" is the root)."""
    return any(
        outer == "" or name.startswith(f"{outer}.") for outer in outer_names if outer != name
    )


# An adapter file (``adapter_state_dict`` / ``save_adapter``) is a plain dict that
# ``torch.load(..., weights_only=True)`` accepts (no pickled code runs on loading):
#     {"format": "dora-tutorial-adapter/1",
#      "layers": {"0": {"class": "LinearWithDoRA", "kind": "dora", "rank": 4, "alpha": 8.0,
#                       "in_features": 784, "out_features": 64, "dropout": 0.0}, ...},
#      "tensors": {"0.lora.A": (4, 784), "0.lora.B": (64, 4), "0.m": (64,), ...}}
# Tensor keys are the model's own ``state_dict`` keys, so the file names the layers it fits.
# A convolution's entry has "in_channels", "out_channels", "kernel_size" and "groups" instead of
# "in_features" and "out_features".
ADAPTER_FORMAT = "dora-tutorial-adapter/1"
BASE_LAYERS = ("linear", "conv")  # what an adapter layer calls the frozen layer it wraps


def _layer_info(layer: nn.Module) -> dict:
    rank = layer.lora.A.shape[0]
    return {
        "class": type(layer).__name__,
        "kind": "dora" if hasattr(layer, "m") else "lora",
        "rank": int(rank),
        "alpha": float(layer.lora.scaling * rank),
        **_sizes(layer.lora.A, layer.lora.B),
        "dropout": float(getattr(layer, "dropout", 0.0)),  # on the adapter's input, in training
    }


def _sizes(A: torch.Tensor, B: torch.Tensor) -> dict:
    """The wrapped layer's sizes, read from A and B: (rank, in) and (out, rank) for a linear
    layer; (rank, in / groups, kh, kw) and (out, rank / groups, 1, 1) for a convolution."""
    if A.dim() == 2:
        return {"in_features": int(A.shape[1]), "out_features": int(B.shape[0])}
    groups = A.shape[0] // B.shape[1]
    return {
        "in_channels": int(A.shape[1] * groups),
        "out_channels": int(B.shape[0]),
        "kernel_size": [int(k) for k in A.shape[2:]],
        "groups": int(groups),
    }


def _adapter_params(name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
    """{model state_dict key: parameter} for a layer's adapter parameters (all but the wrapped
    layer's, ``linear.*`` or ``conv.*``)."""
    prefix = f"{name}." if name else ""
    return {
        prefix + n: p for n, p in layer.named_parameters() if n.partition(".")[0] not in BASE_LAYERS
    }


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter alone: its tensors (CPU copies, so a file saved on a GPU loads anywhere) and,
    per layer, class, kind, rank and alpha."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapter layers (modules with merged_weight())")
    tensors = {}
    for name, layer in layers.items():
        tensors.update(
            {k: p.detach().to("cpu", copy=True) for k, p in _adapter_params(name, layer).items()}
        )
    return {
        "format": ADAPTER_FORMAT,
        "layers": {name: _layer_info(layer) for name, layer in layers.items()},
        "tensors": tensors,
    }


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``adapter_state_dict(model)`` to ``path`` atomically (see ``write_atomic``)."""
    buffer = io.BytesIO()
    torch.save(adapter_state_dict(model), buffer)
    write_atomic(Path(path), [buffer.getvalue()])
    return Path(path)


def load_adapter(model: nn.Module, source) -> nn.Module:
    """Copy a saved adapter (a path, or a dict from ``adapter_state_dict``) into ``model``.

    ``model`` must already be wrapped the same way (same layers, kinds, ranks, alphas), e.g.
    ``add_adapters(pretrained, LinearWithDoRA, rank, alpha)``. Everything is checked before any
    tensor is copied; a mismatch raises ``ValueError`` saying what differs and leaves the model
    untouched. Textbook and efficient DoRA classes are interchangeable (same parameters).
    """
    adapter = _read_adapter(source)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(
            "the model has no adapter layers: wrap it first, e.g. "
            "add_adapters(pretrained, LinearWithDoRA, rank, alpha)"
        )
    saved = adapter["layers"]
    if set(saved) != set(layers):
        raise ValueError(
            "the adapter belongs to other layers: the file has adapters for "
            f"{_names(set(saved) - set(layers))} that the model lacks, and the model has adapter "
            f"layers {_names(set(layers) - set(saved))} that the file lacks"
        )
    problems = [p for name, layer in layers.items() if (p := _mismatch(name, layer, saved[name]))]
    expected = {
        k: p for name, layer in layers.items() for k, p in _adapter_params(name, layer).items()
    }
    tensors = adapter["tensors"]
    if not problems and set(tensors) != set(expected):
        problems.append(
            f"missing tensors {_names(set(expected) - set(tensors))}; "
            f"unexpected tensors {_names(set(tensors) - set(expected))}"
        )
    if not problems:
        problems += [
            f"tensor {k!r}: shape {tuple(tensors[k].shape)} in the file, "
            f"{tuple(p.shape)} in the model"
            for k, p in expected.items()
            if tensors[k].shape != p.shape
        ]
    if problems:
        raise ValueError("the adapter does not fit this model:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k])
    return model


def _mismatch(name: str, layer: nn.Module, want: dict) -> str | None:
    """What makes a saved layer ``want`` unfit for the model's ``layer``, in words (or None)."""
    have = _layer_info(layer)
    if have["kind"] != want["kind"]:
        return (
            f"layer {name!r}: the file holds a {want['kind'].upper()} adapter "
            f"({want['class']}), the model's layer is {have['class']} ({have['kind'].upper()})"
        )
    if have["rank"] != want["rank"]:
        return (
            f"layer {name!r}: the file has rank {want['rank']}, the model rank {have['rank']}; "
            f"wrap the model with rank={want['rank']}"
        )
    if not math.isclose(have["alpha"], want["alpha"], rel_tol=1e-9):
        return (
            f"layer {name!r}: the file has alpha {want['alpha']:g}, the model alpha "
            f"{have['alpha']:g} (scaling alpha/rank differs); wrap with alpha={want['alpha']:g}"
        )
    return None


def _names(items) -> str:
    return ", ".join(repr(i) for i in sorted(items)) or "none"


def _read_adapter(source) -> dict:
    if isinstance(source, str | os.PathLike):
        if Path(source).is_dir():
            raise ValueError(
                f"{os.fspath(source)!r} is a directory: for a PEFT adapter directory (what "
                "save_pretrained writes) use load_peft_adapter"
            )
        where = f"{os.fspath(source)!r}"
        adapter = _torch_load(source, where)
    else:
        adapter, where = source, "the adapter dict"
    if not isinstance(adapter, dict) or adapter.get("format") != ADAPTER_FORMAT:
        found = adapter.get("format") if isinstance(adapter, dict) else type(adapter).__name__
        raise ValueError(
            f"{where} is not an adapter saved by save_adapter (format {found!r}, expected "
            f"{ADAPTER_FORMAT!r}); for a PEFT state dict use from_peft_state_dict first"
        )
    _check_finite(adapter.get("tensors", {}), where)
    return adapter


NOT_AN_ADAPTER = (
    "{where} is not an adapter file ({why}): an adapter file is what "
    "helpers.save_adapter(model, path) writes, a dict with the adapter's format, layers and "
    "tensors; make one with save_adapter(model, path) from a model wrapped with add_adapters"
)


def _torch_load(path, where: str):
    """torch.load with weights_only=True (no pickled code runs), or this project's error.

    torch's own message for a file it refuses suggests weights_only=False, which would run
    whatever code the file holds: it is never passed on."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (not a zip / pickle), EOFError, ...
        why = f"torch.load cannot read it safely: {type(err).__name__}"
        raise ValueError(NOT_AN_ADAPTER.format(where=where, why=why)) from None


def _check_finite(tensors: dict, where: str) -> None:
    """Refuse an adapter whose tensors hold NaN or inf, naming the first such tensor."""
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {key!r} is a {type(t).__name__}, not a tensor")
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"{where}: tensor {key!r} holds {bad} NaN or inf value(s) of {t.numel()}: the "
                "adapter is damaged (or was saved after training diverged); nothing was loaded"
            )


# Hugging Face PEFT names the same tensors differently (keys as get_peft_model_state_dict
# writes them for a get_peft_model wrapper of the same base model).
_PEFT_PREFIX = "base_model.model."
_PEFT_NAMES = {"lora.A": "lora_A.weight", "lora.B": "lora_B.weight", "m": "lora_magnitude_vector"}


def _as_adapter(source) -> dict:
    return adapter_state_dict(source) if isinstance(source, nn.Module) else _read_adapter(source)


def to_peft_state_dict(source) -> dict[str, torch.Tensor]:
    """Our adapter (a model, a path or an adapter dict) with PEFT's saved-adapter keys:
    ``base_model.model.<layer>.lora_A.weight``, ``...lora_B.weight`` and, for DoRA,
    ``...lora_magnitude_vector``. Load with ``peft.set_peft_model_state_dict``, using
    ``LoraConfig(**peft_config_kwargs(source))``."""
    adapter = _as_adapter(source)
    out = {}
    for name in adapter["layers"]:
        prefix = f"{name}." if name else ""
        conv = adapter["tensors"][prefix + "lora.A"].dim() == 4
        for ours, theirs in _PEFT_NAMES.items():
            if prefix + ours in adapter["tensors"]:
                t = adapter["tensors"][prefix + ours]
                if ours == "m" and conv:
                    t = t.reshape(1, -1, 1, 1)  # a Conv2d's m, in PEFT's shape (1, out, 1, 1)
                out[f"{_PEFT_PREFIX}{prefix}{theirs}"] = t
    return out


def peft_config_kwargs(source) -> dict:
    """Keyword arguments for ``peft.LoraConfig`` that reproduce our adapter's layout.

    The most common rank and alpha become ``r`` and ``lora_alpha``; layers that differ (e.g. a
    head clipped to full rank by ``add_adapters``) go into ``rank_pattern`` / ``alpha_pattern``
    as ``"^<name>"``, which PEFT's pattern matching then applies to that exact module only.
    ``target_modules`` is a regular expression that PEFT matches against whole module names.
    """
    info = _as_adapter(source)["layers"]
    kinds = {i["kind"] for i in info.values()}
    if len(kinds) != 1:
        raise ValueError(f"PEFT needs one kind of adapter per model, found {sorted(kinds)}")
    rank = Counter(i["rank"] for i in info.values()).most_common(1)[0][0]
    alpha = Counter(i["alpha"] for i in info.values()).most_common(1)[0][0]
    dropouts = {i.get("dropout", 0.0) for i in info.values()}
    if len(dropouts) != 1:
        raise ValueError(f"PEFT has one lora_dropout per adapter, the layers use {dropouts}")
    return {
        "r": rank,
        "lora_alpha": alpha,
        "use_dora": kinds == {"dora"},
        "lora_dropout": dropouts.pop(),
        "target_modules": "|".join(re.escape(n) for n in info),
        "rank_pattern": {
            f"^{re.escape(n)}": i["rank"] for n, i in info.items() if i["rank"] != rank
        },
        "alpha_pattern": {
            f"^{re.escape(n)}": i["alpha"] for n, i in info.items() if i["alpha"] != alpha
        },
    }


def from_peft_state_dict(state_dict: dict, config, adapter_name: str = "default") -> dict:
    """A PEFT LoRA/DoRA state dict -> our adapter dict (for ``load_adapter``).

    Accepts the saved-adapter keys (``get_peft_model_state_dict``) and a live PEFT model's
    ``state_dict()`` (keys with ``.<adapter_name>.``; base-layer weights are skipped).
    ``config`` is the ``LoraConfig`` (or a dict of its options, at least ``lora_alpha``): alpha
    is not stored in the tensors. Ranks come from the shapes and must agree with the config's
    ``r`` / ``rank_pattern``. Options these layers do not implement (``use_rslora``, a trained
    bias, weights stored transposed, ...: see ``peft_options_problems``) raise ``ValueError``.
    """
    options = config if isinstance(config, dict) else config.to_dict()  # a LoraConfig
    problems = peft_options_problems(options)
    if problems:
        raise ValueError(
            "the PEFT adapter uses options these layers do not implement:\n  "
            + "\n  ".join(problems)
        )
    a, prefix = re.escape(adapter_name), re.escape(_PEFT_PREFIX)
    patterns = {
        "lora.A": re.compile(rf"^(?:{prefix})?(.*?)\.?lora_A(?:\.{a})?\.weight$"),
        "lora.B": re.compile(rf"^(?:{prefix})?(.*?)\.?lora_B(?:\.{a})?\.weight$"),
        "m": re.compile(rf"^(?:{prefix})?(.*?)\.?lora_magnitude_vector(?:\.{a}\.weight)?$"),
    }
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if ".base_layer." in key:
            continue
        for ours, pattern in patterns.items():
            if match := pattern.match(key):
                layers.setdefault(match.group(1), {})[ours] = tensor
                break
        else:
            raise ValueError(f"unrecognised key in the PEFT state dict: {key!r}")
    if not layers:
        raise ValueError("no LoRA/DoRA tensors found in the PEFT state dict")
    if options.get("lora_alpha") is None:
        raise ValueError(
            "config has no lora_alpha: pass the LoraConfig the adapter was trained with"
        )
    info, tensors = {}, {}
    for name, parts in layers.items():
        if "lora.A" not in parts or "lora.B" not in parts:
            raise ValueError(f"layer {name!r}: the PEFT state dict lacks lora_A or lora_B")
        A = parts["lora.A"]
        problems += _peft_layer_problems(name, parts, int(A.shape[0]), options)
        info[name] = {
            "class": "peft lora.Linear" if A.dim() == 2 else "peft lora.Conv2d",
            "kind": "dora" if "m" in parts else "lora",
            "rank": int(A.shape[0]),
            "alpha": float(
                _pattern_value(name, options.get("alpha_pattern"), options["lora_alpha"])
            ),
            **_sizes(A, parts["lora.B"]),
            "dropout": float(options.get("lora_dropout") or 0.0),
        }
        if "m" in parts:
            parts["m"] = parts["m"].flatten()  # a Conv2d's is (1, out, 1, 1) in PEFT, ours (out,)
        tensors.update({(f"{name}." if name else "") + k: v for k, v in parts.items()})
    if problems:
        raise ValueError("the PEFT adapter contradicts its config:\n  " + "\n  ".join(problems))
    return {"format": ADAPTER_FORMAT, "layers": info, "tensors": tensors}


def _pattern_value(name: str, patterns, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first pattern that matches the end
    of the module name (after a dot), else ``default``."""
    return next(
        (v for k, v in (patterns or {}).items() if re.match(rf"(.*\.)?({k})$", name)), default
    )


def _peft_layer_problems(name: str, parts: dict, rank: int, options: dict) -> list[str]:
    """Where one layer's tensors contradict the config (rank, use_dora), in words."""
    problems = []
    if options.get("r") is not None:
        want = _pattern_value(name, options.get("rank_pattern"), options["r"])
        if want != rank:
            problems.append(f"layer {name!r}: the config says rank {want}, its tensors have {rank}")
    if options.get("use_dora") and "m" not in parts:
        problems.append(
            f"layer {name!r}: use_dora=True but no lora_magnitude_vector (DoRA's magnitude m)"
        )
    if options.get("use_dora") is False and "m" in parts:
        problems.append(f"layer {name!r}: a lora_magnitude_vector, but use_dora=False")
    return problems


# LoraConfig options these layers implement, and options that only say how PEFT found or
# initialised the layers (the saved tensors settle both). Every other option must be off (None,
# False, empty or "none"): the layers would compute another function, so it is refused.
_PEFT_HANDLED = {
    *("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_dora", "lora_dropout"),
    *("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"),
    *("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"),
    *("auto_mapping", "peft_version", "runtime_config", "init_lora_weights", "megatron_core"),
    *("loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size"),
    "ensure_weight_tying",
}
_PEFT_WHY = {
    "use_rslora": "scales the update by alpha/sqrt(r); these layers use alpha/r",
    "fan_in_fan_out": "stores weights transposed (Conv1D); these layers wrap nn.Linear",
    "bias": "trains the base layers' biases too; these layers keep them frozen",
    "lora_bias": "gives lora_B a bias; these layers have none",
    "modules_to_save": "trains full copies of other modules, which these layers do not hold",
}
# init_lora_weights that only initialise A and B; the others (pissa, olora, corda, loftq,
# lora_ga) also change the base weights, so the adapter fits only the changed base model.
_PEFT_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def peft_options_problems(options: dict) -> list[str]:
    """What in a PEFT adapter config (a dict) these layers cannot reproduce, in words."""
    problems = []
    if options.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type={options['peft_type']!r}: not a LoRA/DoRA adapter")
    init = options.get("init_lora_weights", True)
    if init not in _PEFT_PLAIN_INITS:
        problems.append(
            f"init_lora_weights={init!r} changes the base weights: convert the adapter first "
            "(PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    for key, value in options.items():
        if key not in _PEFT_HANDLED and value not in (None, False, "none", [], {}):
            why = _PEFT_WHY.get(key, "an option these layers do not implement")
            problems.append(f"{key}={value!r}: {why}")
    return problems


# ---- PEFT adapter directories: what save_pretrained writes and from_pretrained reads ---------

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PEFT_FILES = {PEFT_CONFIG, PEFT_WEIGHTS, "adapter_model.bin", "README.md"}  # of an earlier save
# The options PEFT reads besides peft_config_kwargs' (their values here: plain LoRA/DoRA).
_PEFT_PLAIN = {
    "peft_type": "LORA",
    "task_type": None,
    "base_model_name_or_path": None,
    "inference_mode": True,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "init_lora_weights": True,
    "modules_to_save": None,
}


def save_peft_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's adapter as a PEFT adapter directory, atomically: ``adapter_config.json``
    and ``adapter_model.safetensors``, which ``PeftModel.from_pretrained(base, directory)``
    loads onto the pretrained model. Built from ``peft_config_kwargs`` and
    ``to_peft_state_dict``; written with ``write_atomic_dir`` (an existing directory is
    replaced only if it holds nothing but an earlier adapter)."""
    from safetensors.torch import save  # safetensors comes with peft (requirements.txt)

    adapter = adapter_state_dict(model)  # one CPU copy for both
    config = {**_PEFT_PLAIN, **peft_config_kwargs(adapter)}
    tensors = {k: t.contiguous() for k, t in to_peft_state_dict(adapter).items()}
    files = {
        PEFT_CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
        PEFT_WEIGHTS: save(tensors, metadata={"format": "pt"}),
    }
    write_atomic_dir(Path(directory), files, replaceable=_PEFT_FILES)
    return Path(directory)


def read_peft_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) of a PEFT adapter directory, with errors that name the file."""
    directory = Path(directory)
    config_path = directory / PEFT_CONFIG
    if not config_path.is_file():
        raise ValueError(f"{str(directory)!r} has no {PEFT_CONFIG}: not a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(config_path)!r} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} holds a {type(config).__name__}, not a config")
    weights = directory / PEFT_WEIGHTS
    try:
        if weights.is_file():
            from safetensors.torch import load

            return config, load(weights.read_bytes())
        if (directory / "adapter_model.bin").is_file():  # save_pretrained(safe_serialization=False)
            bin_path = directory / "adapter_model.bin"
            return config, _torch_load(bin_path, repr(str(bin_path)))
    except ValueError:
        raise
    except Exception as err:  # safetensors raises its own types
        raise ValueError(
            f"cannot read the adapter tensors in {str(directory)!r} ({type(err).__name__}: "
            f"{err}): {PEFT_WEIGHTS} should be what PEFT's save_pretrained or "
            "helpers.save_peft_adapter writes"
        ) from err
    raise ValueError(f"{str(directory)!r} has no {PEFT_WEIGHTS}: the adapter's tensors are missing")


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Copy a PEFT LoRA/DoRA adapter directory (``save_pretrained``'s) into ``model``.

    ``model`` must already be wrapped to fit, e.g. ``add_adapters(pretrained, LinearWithDoRA,
    r, lora_alpha)``. Everything is checked before a tensor is copied (the config's options,
    ``from_peft_state_dict``; layers, kinds, ranks, alphas and shapes, ``load_adapter``); a
    directory that does not fit raises ``ValueError`` saying what differs, and ``model`` is
    left untouched. Dropout acts only in training: the model keeps its own."""
    config, tensors = read_peft_adapter(directory)
    _check_finite(tensors, repr(str(directory)))  # named as PEFT names them
    return load_adapter(model, from_peft_state_dict(tensors, config))
