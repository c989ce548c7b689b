"""Adapters as files: our format, and Hugging Face PEFT's names, options and directories.

These functions use only what every adapter layer of the notebook has: the frozen layer
(``linear`` or ``conv``), ``lora.A`` (rank, in) or a kernel, ``lora.B`` (out, rank) or a kernel,
``lora.scaling`` (alpha / rank), ``m`` (out,) for DoRA, and ``merged_weight()``.

Our file is a plain dict that ``torch.load(..., weights_only=True)`` accepts (no pickled code
runs): {"format": "dora-tutorial-adapter/1", "layers": {name: {class, kind, rank, alpha, sizes,
dropout}}, "tensors": {model state_dict key: tensor}}, so the file names the layers it fits.
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

from dora_tutorial.atomic_write import write_atomic, write_atomic_dir

_FORMAT = "dora-tutorial-adapter/1"
_BASE_LAYERS = ("linear", "conv")  # what an adapter layer calls the frozen layer it wraps


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: layer} for every outermost module with ``merged_weight()`` ("" the root)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if callable(getattr(module, "merged_weight", None)) and not inside(name, found):
            found[name] = module
    return found


def inside(name: str, outer_names) -> bool:
    """Whether module ``name`` lies strictly inside one of ``outer_names`` ("" is the root)."""
    return any(o == "" or name.startswith(f"{o}.") for o in outer_names if o != name)


def _sizes(A: torch.Tensor, B: torch.Tensor) -> dict:
    """The wrapped layer's sizes, read from A and B (a convolution's are kernels)."""
    if A.dim() == 2:
        return {"in_features": int(A.shape[1]), "out_features": int(B.shape[0])}
    groups = A.shape[0] // B.shape[1]
    return {
        "in_channels": int(A.shape[1] * groups),
        "out_channels": int(B.shape[0]),
        "kernel_size": [int(k) for k in A.shape[2:]],
        "groups": int(groups),
    }


def _layer_info(layer: nn.Module) -> dict:
    rank = int(layer.lora.A.shape[0])
    return {
        "class": type(layer).__name__,
        "kind": "dora" if hasattr(layer, "m") else "lora",
        "rank": rank,
        "alpha": float(layer.lora.scaling * rank),
        **_sizes(layer.lora.A, layer.lora.B),
        "dropout": float(getattr(layer, "dropout", 0.0)),
    }


def _adapter_params(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """{model state_dict key: parameter} for the layers' parameters but the wrapped layer's."""
    return {
        (f"{name}." if name else "") + n: p
        for name, layer in layers.items()
        for n, p in layer.named_parameters()
        if n.partition(".")[0] not in _BASE_LAYERS
    }


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter alone: CPU copies of its tensors (a file saved on a GPU loads anywhere) and,
    per layer, class, kind, rank and alpha."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no adapter layers (modules with merged_weight())")
    return {
        "format": _FORMAT,
        "layers": {name: _layer_info(layer) for name, layer in layers.items()},
        "tensors": {k: p.detach().to("cpu", copy=True) for k, p in _adapter_params(layers).items()},
    }


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``adapter_state_dict(model)`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(adapter_state_dict(model), buffer)
    write_atomic(Path(path), [buffer.getvalue()])
    return Path(path)


def _names(items) -> str:
    return ", ".join(repr(i) for i in sorted(items)) or "none"


def _mismatch(name: str, have: dict, want: dict) -> str | None:
    """What makes a saved layer ``want`` unfit for the model's layer ``have``, in words."""
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


def load_adapter(model: nn.Module, source) -> nn.Module:
    """Copy a saved adapter (a path, or a dict from ``adapter_state_dict``) into ``model``,
    already wrapped the same way (same layers, kinds, ranks, alphas). Everything is checked
    before a tensor is copied: a mismatch raises ``ValueError`` and leaves the model untouched.
    """
    adapter = _read_adapter(source)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(
            "the model has no adapter layers: wrap it first, e.g. "
            "add_adapters(pretrained, LinearWithDoRA, rank, alpha)"
        )
    saved, tensors = adapter["layers"], adapter["tensors"]
    if set(saved) != set(layers):
        raise ValueError(
            "the adapter belongs to other layers: the file has adapters for "
            f"{_names(set(saved) - set(layers))} that the model lacks, and the model has adapter "
            f"layers {_names(set(layers) - set(saved))} that the file lacks"
        )
    problems = [
        p for n, layer in layers.items() if (p := _mismatch(n, _layer_info(layer), saved[n]))
    ]
    expected = _adapter_params(layers)
    if not problems and set(tensors) != set(expected):
        problems.append(
            f"missing tensors {_names(set(expected) - set(tensors))}; "
            f"unexpected tensors {_names(set(tensors) - set(expected))}"
        )
    if not problems:
        problems = [
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


def _read_adapter(source) -> dict:
    """Our adapter dict from a path or a dict, refused unless it is one with finite tensors."""
    where = "the adapter dict"
    if isinstance(source, str | os.PathLike):
        where = repr(os.fspath(source))
        if Path(source).is_dir():
            raise ValueError(
                f"{where} is a directory: for a PEFT adapter directory (what "
                "save_pretrained writes) use load_peft_adapter"
            )
        source = _torch_load(source, where)
    if not isinstance(source, dict) or source.get("format") != _FORMAT:
        found = source.get("format") if isinstance(source, dict) else type(source).__name__
        raise ValueError(
            f"{where} is not an adapter saved by save_adapter (format {found!r}, expected "
            f"{_FORMAT!r}); for a PEFT state dict use from_peft_state_dict first"
        )
    _check_finite(source.get("tensors", {}), where)
    return source


def _torch_load(path, where: str):
    """torch.load with weights_only=True, or this project's error: torch's own suggests
    weights_only=False, which would run whatever code the file holds."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (not a zip / pickle), EOFError, ...
        raise ValueError(
            f"{where} is not an adapter file (torch.load cannot read it safely: "
            f"{type(err).__name__}): an adapter file is what helpers.save_adapter(model, path) "
            "writes, a dict with the adapter's format, layers and tensors; make one with "
            "save_adapter(model, path) from a model wrapped with add_adapters"
        ) from None


def _check_finite(tensors: dict, where: str) -> None:
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where}: {key!r} is a {type(t).__name__}, not a tensor")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(
                f"{where}: tensor {key!r} holds {int((~torch.isfinite(t)).sum())} NaN or inf "
                f"value(s) of {t.numel()}: the adapter is damaged (or was saved after training "
                "diverged); nothing was loaded"
            )


# PEFT's saved-adapter keys (get_peft_model_state_dict of a get_peft_model wrapper)
_PEFT_PREFIX = "base_model.model."
_PEFT_NAMES = {"lora.A": "lora_A.weight", "lora.B": "lora_B.weight", "m": "lora_magnitude_vector"}


def _as_adapter(source) -> dict:
    return adapter_state_dict(source) if isinstance(source, nn.Module) else _read_adapter(source)


def to_peft_state_dict(source) -> dict[str, torch.Tensor]:
    """Our adapter (a model, a path or an adapter dict) under PEFT's saved-adapter keys, for
    ``peft.set_peft_model_state_dict`` with ``LoraConfig(**peft_config_kwargs(source))``."""
    adapter = _as_adapter(source)
    tensors, out = adapter["tensors"], {}
    for name in adapter["layers"]:
        prefix = f"{name}." if name else ""
        conv = tensors[prefix + "lora.A"].dim() == 4
        for ours, theirs in _PEFT_NAMES.items():
            if (t := tensors.get(prefix + ours)) is not None:
                if ours == "m" and conv:
                    t = t.reshape(1, -1, 1, 1)  # PEFT keeps a Conv2d's m as (1, out, 1, 1)
                out[f"{_PEFT_PREFIX}{prefix}{theirs}"] = t
    return out


def peft_config_kwargs(source) -> dict:
    """``peft.LoraConfig`` keyword arguments that reproduce our adapter's layout.

    The most common rank and alpha become ``r`` and ``lora_alpha``; layers that differ (a head
    clipped to full rank) go into ``rank_pattern`` / ``alpha_pattern`` as ``"^<name>"``, which
    PEFT applies to that exact module only."""
    info = _as_adapter(source)["layers"]
    kinds = {i["kind"] for i in info.values()}
    if len(kinds) != 1:
        raise ValueError(f"PEFT needs one kind of adapter per model, found {sorted(kinds)}")
    dropouts = {i.get("dropout", 0.0) for i in info.values()}
    if len(dropouts) != 1:
        raise ValueError(f"PEFT has one lora_dropout per adapter, the layers use {dropouts}")
    common = {
        k: Counter(i[k] for i in info.values()).most_common(1)[0][0] for k in ("rank", "alpha")
    }

    def pattern(key):
        return {f"^{re.escape(n)}": i[key] for n, i in info.items() if i[key] != common[key]}

    return {
        "r": common["rank"],
        "lora_alpha": common["alpha"],
        "use_dora": kinds == {"dora"},
        "lora_dropout": dropouts.pop(),
        "target_modules": "|".join(re.escape(n) for n in info),
        "rank_pattern": pattern("rank"),
        "alpha_pattern": pattern("alpha"),
    }


def _pattern_value(name: str, patterns, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first pattern matching the end of
    the module name (after a dot), else ``default``."""
    return next(
        (v for k, v in (patterns or {}).items() if re.match(rf"(.*\.)?({k})$", name)), default
    )


def from_peft_state_dict(state_dict: dict, config, adapter_name: str = "default") -> dict:
    """A PEFT LoRA/DoRA state dict -> our adapter dict (for ``load_adapter``).

    Takes saved-adapter keys and a live PEFT model's ``state_dict()`` (base weights skipped).
    ``config``: the ``LoraConfig`` or a dict of its options (alpha is not in the tensors); ranks
    come from the shapes and must agree with it. Options these layers do not implement raise
    ``ValueError``."""
    options = config if isinstance(config, dict) else config.to_dict()
    problems = _peft_options_problems(options)
    if problems:
        raise ValueError(
            "the PEFT adapter uses options these layers do not implement:\n  "
            + "\n  ".join(problems)
        )
    a, prefix = re.escape(adapter_name), re.escape(_PEFT_PREFIX)
    patterns = {
        ours: re.compile(rf"^(?:{prefix})?(.*?)\.?{theirs}{tail}$")
        for ours, theirs, tail in (
            ("lora.A", "lora_A", rf"(?:\.{a})?\.weight"),
            ("lora.B", "lora_B", rf"(?:\.{a})?\.weight"),
            ("m", "lora_magnitude_vector", rf"(?:\.{a}\.weight)?"),
        )
    }
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if ".base_layer." in key:
            continue
        match = next(((o, m) for o, p in patterns.items() if (m := p.match(key))), None)
        if match is None:
            raise ValueError(f"unrecognised key in the PEFT state dict: {key!r}")
        layers.setdefault(match[1].group(1), {})[match[0]] = tensor
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
        A, dora, rank = parts["lora.A"], "m" in parts, int(parts["lora.A"].shape[0])
        if options.get("r") is not None:
            want = _pattern_value(name, options.get("rank_pattern"), options["r"])
            if want != rank:
                problems.append(
                    f"layer {name!r}: the config says rank {want}, its tensors have {rank}"
                )
        if options.get("use_dora") and not dora:
            problems.append(
                f"layer {name!r}: use_dora=True but no lora_magnitude_vector (DoRA's magnitude m)"
            )
        if options.get("use_dora") is False and dora:
            problems.append(f"layer {name!r}: a lora_magnitude_vector, but use_dora=False")
        info[name] = {
            "class": "peft lora.Linear" if A.dim() == 2 else "peft lora.Conv2d",
            "kind": "dora" if dora else "lora",
            "rank": rank,
            "alpha": float(
                _pattern_value(name, options.get("alpha_pattern"), options["lora_alpha"])
            ),
            **_sizes(A, parts["lora.B"]),
            "dropout": float(options.get("lora_dropout") or 0.0),
        }
        if dora:
            parts["m"] = parts["m"].flatten()  # a Conv2d's is (1, out, 1, 1) in PEFT, ours (out,)
        tensors.update({(f"{name}." if name else "") + k: v for k, v in parts.items()})
    if problems:
        raise ValueError("the PEFT adapter contradicts its config:\n  " + "\n  ".join(problems))
    return {"format": _FORMAT, "layers": info, "tensors": tensors}


# LoraConfig options these layers implement, or that only say how PEFT found or initialised the
# layers (the saved tensors settle both). Any other option must be off (None, False, empty or
# "none"): the layers would compute another function.
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
# inits that set only A and B; the others (pissa, olora, corda, loftq, lora_ga) change the base
_PEFT_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def _peft_options_problems(options: dict) -> list[str]:
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
            problems.append(
                f"{key}={value!r}: {_PEFT_WHY.get(key, 'an option these layers do not implement')}"
            )
    return problems


_CONFIG, _WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_REPLACEABLE = {_CONFIG, _WEIGHTS, "adapter_model.bin", "README.md"}  # an earlier save's files
_PEFT_PLAIN = {  # the options PEFT reads besides peft_config_kwargs': plain LoRA/DoRA
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
    """Write the model's adapter as a PEFT adapter directory (what ``PeftModel.from_pretrained``
    loads), atomically; an existing directory is replaced only if it holds an earlier adapter."""
    from safetensors.torch import save  # safetensors comes with peft (requirements.txt)

    adapter = adapter_state_dict(model)
    config = {**_PEFT_PLAIN, **peft_config_kwargs(adapter)}
    tensors = {k: t.contiguous() for k, t in to_peft_state_dict(adapter).items()}
    files = {
        _CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
        _WEIGHTS: save(tensors, metadata={"format": "pt"}),
    }
    write_atomic_dir(Path(directory), files, replaceable=_REPLACEABLE)
    return Path(directory)


def _read_peft_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) of a PEFT adapter directory, with errors that name the file."""
    config_path, weights, bin_path = (
        directory / n for n in (_CONFIG, _WEIGHTS, "adapter_model.bin")
    )
    if not config_path.is_file():
        raise ValueError(f"{str(directory)!r} has no {_CONFIG}: not a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(config_path)!r} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} holds a {type(config).__name__}, not a config")
    if bin_path.is_file() and not weights.is_file():  # save_pretrained(safe_serialization=False)
        return config, _torch_load(bin_path, repr(str(bin_path)))
    if not weights.is_file():
        raise ValueError(f"{str(directory)!r} has no {_WEIGHTS}: the adapter's tensors are missing")
    try:
        from safetensors.torch import load

        return config, load(weights.read_bytes())
    except Exception as err:  # safetensors raises its own types
        raise ValueError(
            f"cannot read the adapter tensors in {str(directory)!r} ({type(err).__name__}: "
            f"{err}): {_WEIGHTS} should be what PEFT's save_pretrained or "
            "helpers.save_peft_adapter writes"
        ) from err


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Copy a PEFT LoRA/DoRA adapter directory (``save_pretrained``'s) into ``model``, already
    wrapped to fit; checked as ``from_peft_state_dict`` and ``load_adapter`` check, before
    anything is copied. Dropout acts only in training: the model keeps its own."""
    config, tensors = _read_peft_adapter(Path(directory))
    _check_finite(tensors, repr(str(directory)))  # named as PEFT names them
    return load_adapter(model, from_peft_state_dict(tensors, config))
