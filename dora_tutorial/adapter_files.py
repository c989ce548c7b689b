"""Adapters as files: our own (a dict that ``torch.load(..., weights_only=True)`` reads without
running code, naming the layers it fits) and PEFT's adapter directories, names and options."""

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
        raise ValueError("the model has no adapter layers: wrap it first with add_adapters")
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
        kinds = want["kind"].upper(), have["kind"].upper()
        return "the file holds a {} adapter, the model {}: wrap it with {} layers".format(
            *kinds, kinds[0]
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
        raise ValueError(f"the file has adapters for {sorted(saved)}, the model {sorted(layers)}")
    problems = [
        f"layer {n!r}: {p}"
        for n, layer in layers.items()
        if (p := _mismatch(_layer_info(layer), saved[n]))
    ]
    expected = _adapter_params(layers)
    if not problems:
        problems = [
            f"tensor {k!r}: only in the {'file' if k in tensors else 'model'}"
            for k in sorted(tensors.keys() ^ expected.keys())
        ]
        problems += [
            f"tensor {k!r}: shape {tuple(tensors[k].shape)} in the file, {tuple(p.shape)} here"
            for k, p in expected.items()
            if k in tensors and tensors[k].shape != p.shape
        ]
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
                f"{where} is not an adapter file ({type(err).__name__}): save_adapter writes one"
            ) from None
    if not isinstance(source, dict) or source.get("format") != _FORMAT:
        raise ValueError(
            f"{where} is not an adapter from save_adapter (PEFT state dicts: from_peft_state_dict)"
        )
    _check_finite(source.get("tensors", {}), where)
    return source


def _check_finite(tensors: dict, where: str) -> None:
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor) or (t.is_floating_point() and not t.isfinite().all()):
            raise ValueError(
                f"{where}: {key!r} is not a tensor of finite numbers: save a sound adapter again"
            )


# PEFT's saved-adapter keys (get_peft_model_state_dict of a get_peft_model wrapper)
_PEFT_PREFIX = "base_model.model."
_PEFT_NAMES = {"lora.A": "lora_A.weight", "lora.B": "lora_B.weight", "m": "lora_magnitude_vector"}


def _rename(key: str, names: dict[str, str]) -> str:
    """``key`` with its last name (after a dot, or all of it) replaced as ``names`` says."""
    for old, new in names.items():
        if key == old or key.endswith(f".{old}"):
            return key.removesuffix(old) + new
    raise ValueError(
        f"unrecognised adapter tensor {key!r}, not one of {list(names)}: from a PEFT model pass "
        "peft.get_peft_model_state_dict(model), not its state_dict()"
    )


def to_peft_state_dict(source) -> dict[str, torch.Tensor]:
    """Our adapter (a model, a path or an adapter dict) under PEFT's saved-adapter keys, for
    ``peft.set_peft_model_state_dict`` with ``LoraConfig(**peft_config_kwargs(source))``."""
    tensors = _read_adapter(source)["tensors"]
    out = {}
    for key, t in tensors.items():
        if key.endswith("m") and tensors.get(key.removesuffix("m") + "lora.A", t).dim() == 4:
            t = t.reshape(1, -1, 1, 1)  # PEFT keeps a Conv2d's m as (1, out, 1, 1)
        out[_PEFT_PREFIX + _rename(key, _PEFT_NAMES)] = t
    return out


def peft_config_kwargs(source) -> dict:
    """``peft.LoraConfig`` options for our adapter: the most common rank and alpha, and layers
    that differ (a head clipped to full rank) as ``"^<name>"`` patterns (that module only)."""
    info = _read_adapter(source)["layers"]
    kinds, dropouts = ({i[k] for i in info.values()} for k in ("kind", "dropout"))
    if len(kinds) != 1 or len(dropouts) != 1:
        raise ValueError(f"PEFT needs one adapter kind and dropout, not {kinds}, {dropouts}")
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


def _pattern_value(options: dict, key: str, name: str, default):
    """PEFT's ``rank_pattern`` lookup: the first pattern matching the name's end after a dot."""
    patterns = (options.get(key) or {}).items()
    return next((v for k, v in patterns if re.match(rf"(.*\.)?({k})$", name)), default)


def from_peft_state_dict(state_dict: dict, config) -> dict:
    """A PEFT LoRA/DoRA saved-adapter state dict -> our adapter dict. ``config``: the
    ``LoraConfig`` or a dict of its options (alpha is not in the tensors). Layers without
    lora_A, tensors without a layer and a use_dora the tensors contradict: load_adapter refuses."""
    options = config if isinstance(config, dict) else config.to_dict()
    _refuse(_peft_options_problems(options), "the PEFT config does not fit these layers")
    names = {theirs: ours for ours, theirs in _PEFT_NAMES.items()}
    tensors = {_rename(k.removeprefix(_PEFT_PREFIX), names): t for k, t in state_dict.items()}
    info = {}
    for key, A in tensors.items():
        if not key.endswith("lora.A"):
            continue
        name, rank = key.removesuffix("lora.A").removesuffix("."), int(A.shape[0])
        if (want := _pattern_value(options, "rank_pattern", name, options.get("r", rank))) != rank:
            raise ValueError(
                f"layer {name!r}: the config says rank {want}, its tensors have {rank}: the "
                "adapter is damaged; save it again"
            )
        info[name] = {
            "class": "peft lora.Linear" if A.dim() == 2 else "peft lora.Conv2d",
            "kind": "dora" if options.get("use_dora") else "lora",
            "rank": rank,
            "alpha": float(_pattern_value(options, "alpha_pattern", name, options["lora_alpha"])),
            "dropout": float(options.get("lora_dropout") or 0.0),
        }
    tensors = {k: t.flatten() if k.endswith("m") else t for k, t in tensors.items()}  # Conv2d's m
    return {"format": _FORMAT, "layers": info, "tensors": tensors}


# LoraConfig options these layers implement, or that only say how PEFT found or initialised the
# layers (the tensors settle both), with the values they may take (None: any). Any other option
# must be off: use_rslora, bias, lora_bias, modules_to_save, ... change what the model computes.
_PEFT_OPTIONS = dict.fromkeys(
    "r lora_alpha rank_pattern alpha_pattern use_dora lora_dropout target_modules "
    "exclude_modules layers_to_transform layers_pattern task_type revision "
    "base_model_name_or_path inference_mode auto_mapping peft_version runtime_config "
    "megatron_core loftq_config eva_config corda_config lora_ga_config "
    "qalora_group_size ensure_weight_tying".split()
)
_PEFT_OPTIONS["peft_type"] = ("LORA",)
# inits that set only A and B; the others (pissa, olora, corda, loftq, lora_ga) change the base
_PEFT_OPTIONS["init_lora_weights"] = (True, False, "gaussian", "eva", "orthogonal", "mica")
_OFF = (None, False, "none", [], {})


def _peft_options_problems(options: dict) -> list[str]:
    problems = [
        f"{key}={value!r}: not implemented here; train the adapter without it"
        for key, value in options.items()
        if (allowed := _PEFT_OPTIONS.get(key, _OFF)) is not None and value not in allowed
    ]
    if options.get("lora_alpha") is None:
        problems.append("no lora_alpha: pass the LoraConfig the adapter was trained with")
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

    config = _read(Path(directory, _CONFIG), lambda data: dict(json.loads(data)))
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
