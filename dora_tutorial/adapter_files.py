"""Adapters as files: our own (a dict that ``torch.load(..., weights_only=True)`` reads without
running code, naming the layers it fits) and PEFT's adapter directories, names and options."""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path
from statistics import mode

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


def _adapter_layers_of(model: nn.Module) -> dict[str, nn.Module]:
    if not (layers := adapter_layers(model)):
        raise ValueError(
            "the model has no adapter layers (modules with merged_weight()): wrap it first, "
            "e.g. add_adapters(pretrained, LinearWithDoRA, rank, alpha)"
        )
    return layers


def _layer_info(layer: nn.Module) -> dict:
    rank = int(layer.lora.A.shape[0])
    return {
        "class": type(layer).__name__,
        "kind": "dora" if hasattr(layer, "m") else "lora",
        "rank": rank,
        "alpha": float(layer.lora.scaling * rank),
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
    """The adapter alone, on the CPU (a file saved on a GPU loads anywhere)."""
    layers = _adapter_layers_of(model)
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


def _refuse(problems: list[str], headline: str) -> None:
    if problems:
        raise ValueError(f"{headline}:\n  " + "\n  ".join(problems))


def _mismatch(have: dict, want: dict) -> str | None:
    """What makes a saved layer ``want`` unfit for the model's layer ``have``, in words."""
    if have["kind"] != want["kind"]:
        return (
            f"the file holds a {want['kind'].upper()} adapter ({want['class']}), "
            f"the model's layer is {have['class']}"
        )
    for key in ("rank", "alpha"):
        if not math.isclose(have[key], want[key], rel_tol=1e-9):
            return (
                f"the file has {key} {want[key]:g}, the model {key} {have[key]:g}; "
                f"wrap the model with {key}={want[key]:g}"
            )
    return None


def load_adapter(model: nn.Module, source) -> nn.Module:
    """Copy a saved adapter (a path, or a dict from ``adapter_state_dict``) into ``model``,
    wrapped the same way; everything is checked before a tensor is copied."""
    adapter, layers = _read_adapter(source), _adapter_layers_of(model)
    saved, tensors = adapter["layers"], adapter["tensors"]
    if set(saved) != set(layers):
        raise ValueError(
            f"the adapter belongs to other layers: the file has {sorted(saved)}, the model "
            f"{sorted(layers)}"
        )
    problems = [
        f"layer {n!r}: {p}"
        for n, layer in layers.items()
        if (p := _mismatch(_layer_info(layer), saved[n]))
    ]
    expected = _adapter_params(layers)
    if not problems:
        unexpected = sorted(tensors.keys() - expected)
        problems = [f"tensor {k!r}: in the file, not in the model" for k in unexpected]
        for k, p in expected.items():
            if k not in tensors:
                problems.append(f"tensor {k!r}: in the model, not in the file")
            elif tensors[k].shape != p.shape:
                problems.append(
                    f"tensor {k!r}: shape {tuple(tensors[k].shape)} in the file, "
                    f"{tuple(p.shape)} in the model"
                )
    _refuse(problems, "the adapter does not fit this model")
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k])
    return model


def _read_adapter(source) -> dict:
    """Our adapter dict from a model, a path or a dict, refused unless it has finite tensors."""
    if isinstance(source, nn.Module):
        return adapter_state_dict(source)
    where = "the adapter dict"
    if isinstance(source, str | os.PathLike):
        where = repr(os.fspath(source))
        if Path(source).is_dir():
            raise ValueError(f"{where} is a directory: for a PEFT adapter use load_peft_adapter")
        try:  # weights_only: torch's own error advises turning it off, which runs the file's code
            source = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError, RuntimeError, EOFError, ...
            raise ValueError(
                f"{where} is not an adapter file (torch.load cannot read it safely: "
                f"{type(err).__name__}): save_adapter(model, path) writes one"
            ) from None
    if not isinstance(source, dict) or source.get("format") != _FORMAT:
        found = source.get("format") if isinstance(source, dict) else type(source).__name__
        raise ValueError(
            f"{where} is not an adapter saved by save_adapter (format {found!r}, expected "
            f"{_FORMAT!r}); for a PEFT state dict use from_peft_state_dict first"
        )
    _check_finite(source.get("tensors", {}), where)
    return source


def _check_finite(tensors: dict, where: str) -> None:
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor) or (t.is_floating_point() and not t.isfinite().all()):
            raise ValueError(
                f"{where}: {key!r} is not a tensor of finite numbers: the adapter is damaged (or "
                "was saved after training diverged); nothing was loaded"
            )


# PEFT's saved-adapter keys (get_peft_model_state_dict of a get_peft_model wrapper)
_PEFT_PREFIX = "base_model.model."
_PEFT_NAMES = {"lora.A": "lora_A.weight", "lora.B": "lora_B.weight", "m": "lora_magnitude_vector"}


def to_peft_state_dict(source) -> dict[str, torch.Tensor]:
    """Our adapter (a model, a path or an adapter dict) under PEFT's saved-adapter keys, for
    ``peft.set_peft_model_state_dict`` with ``LoraConfig(**peft_config_kwargs(source))``."""
    adapter = _read_adapter(source)
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


def _from_peft_key(key: str) -> tuple[str, str]:
    """(layer name, our tensor name) of a PEFT saved-adapter key."""
    short = key.removeprefix(_PEFT_PREFIX)
    for ours, theirs in _PEFT_NAMES.items():
        if short == theirs or short.endswith(f".{theirs}"):
            return short.removesuffix(theirs).removesuffix("."), ours
    raise ValueError(
        f"unrecognised key in the PEFT state dict: {key!r}; a PEFT model's own state_dict() "
        "holds more: pass peft.get_peft_model_state_dict(model)"
    )


def peft_config_kwargs(source) -> dict:
    """``peft.LoraConfig`` options for our adapter: the most common rank and alpha, and layers
    that differ (a head clipped to full rank) as ``"^<name>"`` patterns (that module only)."""
    info = _read_adapter(source)["layers"]
    kinds, dropouts = ({i.get(k, 0.0) for i in info.values()} for k in ("kind", "dropout"))
    if len(kinds) != 1 or len(dropouts) != 1:
        raise ValueError(
            f"PEFT has one kind of adapter and one lora_dropout per model, the layers have "
            f"{sorted(kinds)} and {sorted(dropouts)}"
        )
    common = {k: mode(i[k] for i in info.values()) for k in ("rank", "alpha")}

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
    """PEFT's ``rank_pattern`` lookup: the first pattern matching the name's end after a dot."""
    return next(
        (v for k, v in (patterns or {}).items() if re.match(rf"(.*\.)?({k})$", name)), default
    )


def from_peft_state_dict(state_dict: dict, config) -> dict:
    """A PEFT LoRA/DoRA saved-adapter state dict -> our adapter dict. ``config``: the
    ``LoraConfig`` or a dict of its options (alpha is not in the tensors)."""
    options = config if isinstance(config, dict) else config.to_dict()
    _refuse(_peft_options_problems(options), "the PEFT adapter uses options these layers lack")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name, ours = _from_peft_key(key)
        layers.setdefault(name, {})[ours] = tensor
    info, tensors, problems = {}, {}, []
    for name, parts in layers.items():
        if "lora.A" not in parts or "lora.B" not in parts:
            raise ValueError(f"layer {name!r}: the PEFT state dict lacks lora_A or lora_B")
        A, dora, rank = parts["lora.A"], "m" in parts, int(parts["lora.A"].shape[0])
        want = _pattern_value(name, options.get("rank_pattern"), options.get("r", rank))
        if want not in (None, rank):
            problems.append(f"layer {name!r}: the config says rank {want}, its tensors have {rank}")
        if options.get("use_dora") not in (None, dora):
            has = "a" if dora else "no"
            problems.append(f"layer {name!r}: use_dora={not dora} but {has} lora_magnitude_vector")
        info[name] = {
            "class": "peft lora.Linear" if A.dim() == 2 else "peft lora.Conv2d",
            "kind": "dora" if dora else "lora",
            "rank": rank,
            "alpha": float(
                _pattern_value(name, options.get("alpha_pattern"), options["lora_alpha"])
            ),
            "dropout": float(options.get("lora_dropout") or 0.0),
        }
        if dora:
            parts["m"] = parts["m"].flatten()  # a Conv2d's is (1, out, 1, 1) in PEFT, ours (out,)
        tensors.update({(f"{name}." if name else "") + k: v for k, v in parts.items()})
    _refuse(problems, "the PEFT adapter contradicts its config")
    return {"format": _FORMAT, "layers": info, "tensors": tensors}


# LoraConfig options these layers implement, or that only say how PEFT found or initialised the
# layers (the tensors settle both). Any other option must be off: it would change the function.
_PEFT_HANDLED = set(
    "r lora_alpha rank_pattern alpha_pattern use_dora lora_dropout target_modules "
    "exclude_modules layers_to_transform layers_pattern peft_type task_type revision "
    "base_model_name_or_path inference_mode auto_mapping peft_version runtime_config "
    "init_lora_weights megatron_core loftq_config eva_config corda_config lora_ga_config "
    "qalora_group_size ensure_weight_tying".split()
)
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
    if options.get("lora_alpha") is None:
        problems.append("no lora_alpha: pass the LoraConfig the adapter was trained with")
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


_CONFIG, _WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_REPLACEABLE = {_CONFIG, _WEIGHTS, "adapter_model.bin", "README.md"}  # an earlier save's files


def save_peft_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """The directory ``PeftModel.from_pretrained`` loads, written atomically; an existing one
    is replaced only if it holds an earlier adapter."""
    from safetensors.torch import save  # safetensors comes with peft (requirements.txt)

    adapter = adapter_state_dict(model)
    config = {"peft_type": "LORA", "inference_mode": True, **peft_config_kwargs(adapter)}
    tensors = {k: t.contiguous() for k, t in to_peft_state_dict(adapter).items()}
    files = {
        _CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
        _WEIGHTS: save(tensors, metadata={"format": "pt"}),
    }
    write_atomic_dir(Path(directory), files, replaceable=_REPLACEABLE)
    return Path(directory)


def load_peft_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """``load_adapter`` for a directory ``save_pretrained`` wrote. Dropout acts only in
    training: the model keeps its own."""
    from safetensors.torch import load

    config = _read(Path(directory, _CONFIG), json.loads)
    if not isinstance(config, dict):
        raise ValueError(f"{_CONFIG} in {str(directory)!r} holds a {type(config).__name__}")
    tensors = _read(Path(directory, _WEIGHTS), load)
    _check_finite(tensors, repr(str(directory)))  # named as PEFT names them
    return load_adapter(model, from_peft_state_dict(tensors, config))


def _read(path: Path, parse):
    try:
        return parse(path.read_bytes())
    except Exception as err:  # a missing file, bad JSON, safetensors' own errors, ...
        raise ValueError(
            f"cannot read {str(path)!r} ({type(err).__name__}: {err}): a PEFT adapter "
            "directory holds what save_pretrained or save_peft_adapter writes"
        ) from err
