"""Hotswap: new weights for one module set, copied into its parameters in place.

The parameters stay the same tensor objects, so everything holding them sees the new values at
its next call: an optimizer, a `torch.compile`d model (no recompile: dynamo reads parameters as
graph inputs and guards on the objects, not on their values), a bank over the sets.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from ..errors import IncompatibleModuleError, ModuleFormatError
from ..modules.config import config_from_dict
from .io import check_compatible, read_description, read_header, weights_file

if TYPE_CHECKING:
    from .modular import ModularModel


def hotswap(model: "ModularModel", name: str, weights: Mapping[str, torch.Tensor] | str | os.PathLike) -> None:
    """Replace the tensors of module set `name` (its modules and its head, if it has one) in place.

    weights: {tensor name: tensor} named as in `model.state_dict()` ("adapters.<name>.…",
    "heads.<name>.…"), or a folder written by `save_pretrained` whose set named `name` (or only
    set) has the same configs. Every tensor of the set must be given, with the parameter's shape;
    floating-point values are cast to the parameter's dtype. Everything is checked before the
    first copy, so a refused swap leaves the set as it was.
    """
    if name not in model.adapters:
        raise KeyError(f"no module set {name!r} to hotswap; sets: {list(model.adapters)}")
    own = {k: p for k, p in model.module_parameters() if k.startswith((f"adapters.{name}.", f"heads.{name}."))}
    if isinstance(weights, (str, os.PathLike)):
        given = _from_folder(model, name, Path(weights), own)
    else:
        given = dict(weights)
        _check(name, own, {k: v.shape if isinstance(v, torch.Tensor) else None for k, v in given.items()})
    for key, new in given.items():
        if not isinstance(new, torch.Tensor) or not new.is_floating_point():
            raise ModuleFormatError(f"hotswap({name!r}): {key} must be a floating-point tensor, got "
                                    f"{new.dtype if isinstance(new, torch.Tensor) else type(new).__name__}")
        if not bool(torch.isfinite(new).all()):
            raise ModuleFormatError(f"hotswap({name!r}): {key} holds NaN or infinite values")
    with torch.no_grad():
        for key, param in own.items():
            param.copy_(given[key])


def _check(name: str, own: dict[str, torch.nn.Parameter], shapes: dict[str, tuple[int, ...] | None]) -> None:
    """Raise unless `shapes` names exactly the set's tensors, each with its parameter's shape."""
    missing, unexpected = sorted(set(own) - set(shapes)), sorted(set(shapes) - set(own))
    if missing or unexpected:
        raise ModuleFormatError(f"hotswap({name!r}) takes exactly the set's tensors: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]} (names as in model.state_dict())")
    for key, param in own.items():
        if shapes[key] is not None and tuple(shapes[key]) != tuple(param.shape):
            raise ModuleFormatError(f"hotswap({name!r}): {key} has shape {tuple(shapes[key])} but the parameter has "
                                    f"{tuple(param.shape)}; a set of another shape needs model.remove({name!r}) "
                                    "and a new attach (and a recompile)")


def _from_folder(model: "ModularModel", name: str, folder: Path,
                 own: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """The tensors of the folder's set `name` (or its only set), renamed to set `name`: its configs must be
    the set's, and its names and shapes (read from the header) the set's before anything is allocated."""
    data = read_description(folder)
    check_compatible(data["base_model"], model.base, str(folder))
    saved = data["modules"]
    source = name if name in saved else next(iter(saved)) if len(saved) == 1 else None
    if source is None:
        raise ModuleFormatError(f"{folder} holds sets {sorted(saved)}, none named {name!r}; save the set alone "
                                "or under that name")
    theirs = [config_from_dict(c).to_dict() for c in saved[source]]
    ours = [m.config.to_dict() for m in model.adapters[name].values()]
    if theirs != ours:
        raise IncompatibleModuleError(f"{folder}: set {source!r} has configs {theirs} but set {name!r} has {ours}; "
                                      "hotswap copies weights into modules of the same configs")
    weights = weights_file(folder)
    renames = {f"adapters.{source}.": f"adapters.{name}.", f"heads.{source}.": f"heads.{name}."}

    def renamed(key: str) -> str | None:
        return next((new + key[len(old):] for old, new in renames.items() if key.startswith(old)), None)
    _check(name, own, {renamed(k): shape for k, (shape, _) in read_header(weights).items() if renamed(k)})
    with safe_open(str(weights), framework="pt") as f:  # the set's tensors only
        return {renamed(k): f.get_tensor(k) for k in f.keys() if renamed(k)}
