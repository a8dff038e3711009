"""Saving and loading module sets: `pelthub.json` (configs, base model) + `modules.safetensors`.

Only module and head tensors are written; the base model's weights never are.
Files are written to a temporary name, fsynced and renamed, so a crash leaves
either the old file or the new one.

Loading treats both files as untrusted: the configs are built on PyTorch's
meta device first (shapes, no memory) and compared with the safetensors
header (names, shapes, dtypes) before anything real is allocated, so a
3 KB file cannot declare a LoRA of rank 2**40; and every tensor must be a
floating-point tensor of finite values.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError, IncompatibleModuleError, ModuleFormatError
from ..modules.base import site_name
from ..modules import jsonsafe
from ..modules.config import MAX_LAYERS, MAX_SIZE, MAX_VOCAB, config_from_dict
from ..sites import Sites

if TYPE_CHECKING:
    from .modular import ModularModel

CONFIG_FILE = "pelthub.json"
WEIGHTS_FILE = "modules.safetensors"
TRAINER_WEIGHTS_FILE = "model.safetensors"  # what transformers.Trainer writes for a model that is no PreTrainedModel
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 16 << 20  # a pelthub.json is kilobytes; refuse to parse more than this
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp_path), fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def base_model_info(base: nn.Module) -> dict[str, Any]:
    """Name, revision when known, and architecture fingerprint of a base model."""
    config = base.config
    return {"name": getattr(config, "name_or_path", "") or "", "revision": getattr(config, "_commit_hash", None),
            "fingerprint": Sites(base).fingerprint()}


def describe(model: "ModularModel", **meta: Any) -> dict[str, Any]:
    return {
        "format": "pelthub", "format_version": FORMAT_VERSION,
        "modules": {name: [m.config.to_dict() for m in s.values()] for name, s in model.adapters.items()},
        "heads": {name: list(h.keys()) for name, h in model.heads.items()},
        "tasks": list(model.task_names),
        "base_model": base_model_info(model.base),
        "trainable_parameters": sum(p.numel() for _, p in model.module_parameters() if p.requires_grad),
        **({"composition": model.composition} if model.composition else {}),
        **meta,
    }


def save_modules(model: "ModularModel", directory: str | os.PathLike, **meta: Any) -> None:
    """Write the module and head tensors and their configs.

    Under FSDP2 (`fully_shard`) the parameters are DTensors: every rank must call this, each
    tensor is gathered whole (a collective), and rank 0 alone writes. FSDP1 shards flat
    parameters that no tensor shows: call it inside `FullyShardedDataParallel.summon_full_params`.
    """
    directory = Path(directory)
    params = dict(model.module_parameters())
    sharded = any(is_dtensor(p) for p in params.values())
    tensors = {name: (p.full_tensor() if is_dtensor(p) else p).detach().cpu().clone() for name, p in params.items()}
    if sharded and torch.distributed.get_rank() != 0:
        return
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(describe(model, **meta), indent=2, sort_keys=True)
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (FSDP2 / tensor-parallel shards). Asked without importing
    torch.distributed.tensor (seconds): no DTensor exists before that module is loaded."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def read_description(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file() and (Path(directory) / TRAINER_WEIGHTS_FILE).is_file():
        raise ModuleFormatError(f"{path} not found: {TRAINER_WEIGHTS_FILE} there is a transformers.Trainer save, "
                                "which holds the module tensors but not their configs; train with "
                                "Trainer(..., callbacks=[ph.SaveModulesCallback()]) (it writes them to args.output_dir "
                                "and every checkpoint), or call model.save_pretrained(dir) for another folder")
    if not path.is_file():
        raise ModuleFormatError(f"{path} not found: a pelthub module directory holds {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE} (write one with model.save_pretrained(dir))")
    data = jsonsafe.read(path, ModuleFormatError, MAX_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise ModuleFormatError(f"{path} must hold a JSON object, got {type(data).__name__}")
    for key, kind in (("modules", dict), ("base_model", dict)):
        if not isinstance(data.get(key), kind):
            raise ModuleFormatError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    _check_base(data["base_model"], path)
    for name, configs in data["modules"].items():  # every number and size checked, for add and pull too
        _configs(name, configs, directory)
    return data


# What a fingerprint may declare: pelthub never builds a base from it, but a card shows these
# numbers and a wrong-typed one must not reach the code that formats or compares them.
FINGERPRINT_SIZES = {"hidden": MAX_SIZE, "layers": MAX_LAYERS, "heads": MAX_SIZE, "vocab": MAX_VOCAB}


def _check_base(info: dict[str, Any], path: Path) -> None:
    """The fingerprint's types and sizes, where given (the registry's card check requires it in full)."""
    fp = info.get("fingerprint", {})
    if not (isinstance(fp, dict) and isinstance(fp.get("sha256", ""), str)
            and isinstance(fp.get("model_type"), (str, type(None)))):
        raise ModuleFormatError(f"{path}: field 'base_model.fingerprint' must be {{'sha256': str, 'model_type': str, "
                                "...}; write the file with model.save_pretrained(dir)")
    for key, maximum in FINGERPRINT_SIZES.items():
        value = fp.get(key)
        if value is not None and (type(value) is not int or not 0 < value <= maximum):
            raise ModuleFormatError(f"{path}: field 'base_model.fingerprint.{key}' must be an integer from 1 to "
                                    f"{maximum:,} (pelthub's cap, far above real models), got {value!r:.80}")


def check_compatible(info: dict[str, Any], base: nn.Module, where: str) -> None:
    """Raise if the module's base architecture differs from `base`; warn if only the name does."""
    here = base_model_info(base)
    theirs = info.get("fingerprint", {}).get("sha256")
    if theirs and theirs != here["fingerprint"]["sha256"]:
        raise IncompatibleModuleError(
            f"{where} was trained on {info.get('name') or 'a model'!r} ({_arch(info)}) but this base is "
            f"{here['name'] or type(base).__name__!r} ({_arch(here)}); load it onto the architecture it was "
            "trained on")
    if info.get("name") and here["name"] and info["name"] != here["name"]:
        warnings.warn(f"{where} was trained on {info['name']!r}; loading onto {here['name']!r}, which has the "
                      "same architecture fingerprint", stacklevel=3)


def _arch(info: dict[str, Any]) -> str:
    f = info.get("fingerprint", {})
    return f"{f.get('model_type')}, hidden {f.get('hidden')}, {f.get('layers')} layers, fingerprint {str(f.get('sha256'))[:12]}"


def weights_file(directory: str | os.PathLike) -> Path:
    """modules.safetensors, or Trainer's model.safetensors (ModularModel.state_dict: the same tensor names)."""
    ours, trainers = Path(directory) / WEIGHTS_FILE, Path(directory) / TRAINER_WEIGHTS_FILE
    return trainers if not ours.is_file() and trainers.is_file() else ours


def read_header(weights: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, safetensors dtype)} from the file's header, reading no tensor data.

    Refuses a file that is not safetensors and any tensor that is not
    floating point (ints, bools, float8), naming the tensor.
    """
    if not weights.is_file():
        raise ModuleFormatError(f"{weights} not found: a module directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ModuleFormatError(f"{weights} is not a readable safetensors file: {e}") from None
    for key, (_, dtype) in header.items():
        if dtype not in FLOAT_DTYPES:
            raise ModuleFormatError(f"{weights}: tensor {key} has dtype {dtype}; module tensors are floating point "
                                    f"({', '.join(FLOAT_DTYPES)}), so this file was not loaded")
    return header


def check_finite(weights: Path) -> None:
    """Refuse NaN or infinite values, naming the tensor; reads one tensor at a time."""
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            refuse_non_finite(weights, key, f.get_tensor(key))


def refuse_non_finite(weights: Path, key: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ModuleFormatError(f"{weights}: tensor {key} holds NaN or infinite values; a trained module "
                                "has finite weights, so this file was not loaded")


def _planned(model: "ModularModel", data: dict[str, Any], heads: bool) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{parameter name: (shape, dtype)} the configs would create, built on the meta device (no memory)."""
    planned: dict[str, tuple[tuple[int, ...], Any]] = {}
    with torch.device("meta"):
        for name, configs in data["modules"].items():
            built = nn.ModuleDict({c.kind: c.build(model.base, model.sites, init=False) for c in configs})
            planned.update({k: (tuple(p.shape), p.dtype) for k, p in built.named_parameters(prefix=f"adapters.{name}")})
    return planned


def _check_plan(weights: Path, header: dict[str, tuple[tuple[int, ...], str]],
                planned: dict[str, tuple[tuple[int, ...], Any]]) -> None:
    saved = {k: v for k, v in header.items() if k.startswith("adapters.")}
    missing, unexpected = sorted(set(planned) - set(saved)), sorted(set(saved) - set(planned))
    if missing or unexpected:
        raise ModuleFormatError(f"{weights} does not match its {CONFIG_FILE}: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
    for key, (shape, dtype) in planned.items():
        if saved[key][0] != shape:
            raise ModuleFormatError(f"{weights}: {key} has shape {saved[key][0]} but {CONFIG_FILE} declares "
                                    f"{shape}; the file and its configs disagree, so nothing was allocated")
        if FLOAT_DTYPES[saved[key][1]] == torch.float64 and dtype != torch.float64:
            raise ModuleFormatError(f"{weights}: tensor {key} is float64 but the module's parameter is {dtype}; "
                                    "save it in the parameter's dtype")


def _configs(name: str, configs: Any, directory: str | os.PathLike) -> list[Any]:
    if not (isinstance(configs, list) and configs and all(isinstance(c, dict) for c in configs)):
        raise ModuleFormatError(f"{Path(directory) / CONFIG_FILE}: modules[{name!r}] must be a non-empty list of "
                                "config objects")
    try:
        return [config_from_dict(c) for c in configs]
    except ConfigError as e:  # a bad config in a file is a malformed file
        raise ModuleFormatError(f"{Path(directory) / CONFIG_FILE}: modules[{name!r}]: {e}") from None


def _composition(data: dict[str, Any], directory: str | os.PathLike) -> list[dict[str, Any]]:
    """The saved composition blocks, each naming module sets the file holds."""
    blocks = data.get("composition", [])
    if not (isinstance(blocks, list) and all(isinstance(b, dict) and isinstance(b.get("block"), str)
                                             and isinstance(b.get("sets"), list) for b in blocks)):
        raise ModuleFormatError(f"{Path(directory) / CONFIG_FILE}: 'composition' must be a list of blocks "
                                "({\"block\": ..., \"sources\": [...], \"sets\": [...]})")
    unknown = [s for b in blocks for s in b["sets"] if s not in data["modules"]]
    if unknown:
        raise ModuleFormatError(f"{Path(directory) / CONFIG_FILE}: 'composition' names module sets {unknown[:5]} "
                                f"that the file does not hold (it holds {sorted(data['modules'])})")
    return blocks


def load_modules(model: "ModularModel", directory: str | os.PathLike, strict_base: bool = True,
                 heads: bool | str = True) -> "ModularModel":
    """Add the module sets saved in `directory` to `model` (checked before anything is allocated).

    heads: True loads a saved task head (it must fit the base's head), False leaves it out,
    "as_saved" takes a head trained for another label count at its own size (only the output
    dimension may differ): the logits then have the saved head's label count, which is for
    reading its predictions (LEEP), not for training with the base's loss.
    """
    if heads not in (True, False, "as_saved"):
        raise ConfigError(f"heads must be True, False or 'as_saved', got {heads!r}")
    data = read_description(directory)
    if strict_base:
        check_compatible(data["base_model"], model.base, str(directory))
    weights = weights_file(directory)
    header = read_header(weights)
    saved_heads = data.get("heads", {})
    data["modules"] = {name: _configs(name, configs, directory) for name, configs in data["modules"].items()}
    _check_plan(weights, header, _planned(model, data, heads))
    state = load_file(str(weights))  # safe to allocate now: names, shapes and dtypes matched the configs
    for key, tensor in state.items():
        refuse_non_finite(weights, key, tensor)
    task_names, composition = model.task_names, model.composition
    added: list[str] = []
    try:
        model.task_names = list(data.get("tasks", [])) or model.task_names
        model.composition = model.composition + _composition(data, directory)
        for name, configs in data["modules"].items():
            head = site_name(saved_heads[name][0]) if heads and saved_heads.get(name) else False
            model.add(name, configs, init=False, head=head)
            added.append(name)
        _copy_state(model, added, weights, state, heads)
    except BaseException:
        for name in reversed(added):  # a set that fails a check is not left half attached
            model.remove(name)
        model.task_names, model.composition = task_names, composition
        raise
    return model


def _copy_state(model: "ModularModel", added: list[str], weights: Path, state: dict[str, torch.Tensor],
                heads: bool | str) -> None:
    """Copy the saved tensors into the just-added sets (not the model's other sets), checking names and shapes."""
    if not heads:
        state = {k: v for k, v in state.items() if not k.startswith("heads.")}
    prefixes = tuple(f"{part}.{name}." for name in added for part in ("adapters", "heads"))
    own = {k: p for k, p in model.module_parameters() if k.startswith(prefixes)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModuleFormatError(f"{weights} does not match its {CONFIG_FILE}: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
    for key, param in own.items():
        saved = state[key]
        if param.shape != saved.shape and key.startswith("heads."):
            if heads == "as_saved" and saved.dim() == param.dim() and saved.shape[1:] == param.shape[1:]:
                param.data = saved.to(param)         # another label count: only the output dimension differs
                continue
            raise IncompatibleModuleError(
                f"{weights}: the saved task head {key} has shape {tuple(saved.shape)} but this base's head "
                f"has {tuple(param.shape)} (another label count?); load with heads=False to take the modules "
                "without the head")
        if param.shape != saved.shape:
            raise ModuleFormatError(f"{weights}: {key} has shape {tuple(saved.shape)}, expected {tuple(param.shape)}")
        param.data.copy_(saved)
