"""`compose`: the one entry point for composed models.

Blocks are either configs like any module kind (fresh modules; routers such
as Poly, UniPELT and AttentionMix build modules that read the call's task ids
or inputs) or composition blocks over existing modules (`Stack`, `Average`,
`WeightedSum`, see blocks.py). A bare source (a saved directory, a registry
ref, a ModularModel or a built module such as `merge`'s result) is read as
`Stack(source)`. Consecutive configs form one module set named `name`; every
block adds sets named `name`, `name-1`, `name-2`, ... in order. So a composed
model is a ModularModel and saves, loads and detaches like one.

A composed model keeps its blocks as data in `model.composition` (see
blocks.py), saved into pelthub.json and read back by `from_pretrained`, and
records the registry modules it reuses in `model.parents`
({"ref", "sha256"} each); pass them on when saving, so the registry keeps the
dependency graph: `model.save_pretrained(dir, parents=model.parents)`.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Union

import torch
from torch import nn

from ..errors import ConfigError, IncompatibleModuleError
from ..model import ModularModel
from ..model.modular import warn_if_wrapped
from ..modules.base import PeltModule
from ..modules.config import Buildable, ModuleConfig, Sourced
from ..modules.prompt import PromptModule
from .blocks import Block, Stack, load_single, load_source, parents
from .merge import merge, merge_prefixes

Part = Union[ModuleConfig, Sourced, Block, str, os.PathLike, ModularModel, PeltModule]


def compose(base: nn.Module, *blocks: Part, name: str = "composed", head: bool | str = False,
            tokenizer: Any = None, registry: Any = None) -> ModularModel:
    """Attach configs and composition blocks to `base` (see the module docstring).

    head: train a copy of the task head with the first set. registry: resolves
    registry-ref sources (needed when a block names one).
    """
    groups = _groups(blocks, registry)
    if not isinstance(base, ModularModel):
        warn_if_wrapped(base)
    model = base if isinstance(base, ModularModel) else ModularModel(base)
    names, added, composition = _names(model, name), [], []
    try:
        for group in groups:
            start = len(added)
            for set_name, item in _sets(group, model, names, registry):
                first = not added
                if isinstance(item, list):
                    model.add(set_name, item, head=head if first else False, tokenizer=tokenizer)
                else:
                    attach_copy(model, set_name, item, head=head if first else False)
                added.append(set_name)
            if isinstance(group, Block):
                composition.append({**group.to_dict(strict=False), "sets": added[start:]})
    except BaseException:
        for set_name in reversed(added):
            model.remove(set_name)
        if model is not base:
            model.detach()
        raise
    found = parents(*groups, registry=registry) + [  # routers that resolved registry refs (ATTEMPT, Arrow)
        p for set_name in added for m in model.adapters[set_name].values() if callable(getattr(m, "parents", None))
        for p in m.parents()]
    model.parents = model.parents + [p for p in found if p not in model.parents]
    model.composition = model.composition + composition
    return model


def attach_copy(model: ModularModel, name: str, module: PeltModule, head: bool | str = False) -> None:
    """Attach a frozen copy of a built module as the set `name`."""
    model.add(name, [module.config], head=head, init=False)
    built = model.adapters[name][module.config.kind]
    try:
        built.load_state_dict(module.state_dict())
    except RuntimeError as e:
        model.remove(name)
        raise IncompatibleModuleError(f"a {module.config.kind} module does not fit this base model: its tensors do "
                                      f"not match the sites here ({str(e).splitlines()[0]}); use modules trained "
                                      "on this base model") from None
    built.requires_grad_(False)


def weighted_sum(modules: list[PeltModule], weights: tuple[float, ...]) -> PeltModule:
    """Σᵢ wᵢ·Mᵢ as one module: LoRA by exact concatenation, prompts and prefixes by summing their tensors."""
    kinds = {m.config.kind for m in modules}
    if kinds == {"lora"}:
        return merge(modules, weights, method="cat")
    if kinds == {"prefix"}:
        return merge_prefixes(modules, weights)
    if kinds == {"prompt"}:
        shapes = {tuple(m.embeddings.shape) for m in modules}
        if len(shapes) > 1:
            raise IncompatibleModuleError(f"prompts of different shapes {sorted(shapes)} cannot be summed; "
                                          "use prompts of one length on one base model")
        with torch.no_grad():
            values = torch.einsum("k,kld->ld", torch.tensor(weights), torch.stack([m.embeddings for m in modules]))
        return PromptModule(modules[0].config, values)
    raise ConfigError(f"WeightedSum and Average combine LoRA or prompt (or prefix) modules of one kind, "
                      f"got {sorted(kinds)}; use Stack to apply other modules in sequence")


def _groups(blocks: tuple[Part, ...], registry: Any) -> list[list[Buildable] | Block]:
    """Consecutive configs as one list; other parts as blocks (a bare source as Stack(source)).

    A `Sourced` config without a registry of its own gets compose's.
    """
    groups: list[list[Buildable] | Block] = []
    for part in blocks:
        if isinstance(part, Sourced):
            part = part.given(registry=registry)
        if isinstance(part, (ModuleConfig, Sourced)):
            if groups and isinstance(groups[-1], list):
                groups[-1].append(part)
            else:
                groups.append([part])
        elif isinstance(part, Block):
            groups.append(part)
        else:
            groups.append(Stack(part))
    if not groups:
        raise ConfigError("compose needs at least one block: a config (e.g. ph.UniPELT(...)) or ph.Stack / "
                          "ph.Average / ph.WeightedSum over existing modules")
    return groups


def _sets(group: list[Buildable] | Block, model: ModularModel, names: Iterator[str],
          registry: Any) -> Iterator[tuple[str, list[Buildable] | PeltModule]]:
    """(set name, configs or built module) to attach for one group."""
    if isinstance(group, list):
        yield next(names), group
    elif isinstance(group, Stack):
        for source in group.sources:
            if isinstance(source, (ModuleConfig, Sourced)):
                yield next(names), [source.given(registry=registry) if isinstance(source, Sourced) else source]
            elif isinstance(source, Block):
                yield from _sets(source, model, names, registry)
            else:
                for module in load_source(source, model.base, registry):
                    yield next(names), module
    else:
        yield next(names), _one_module(group, model, registry)


def _one_module(source: Any, model: ModularModel, registry: Any) -> PeltModule:
    """The single module a source of a sum comes to: a loaded module, or a nested sum merged exactly."""
    if isinstance(source, Stack) and len(source.sources) == 1:
        return _one_module(source.sources[0], model, registry)
    if isinstance(source, Stack):
        raise ConfigError(f"a Stack of {len(source.sources)} sources inside a sum is more than one module; "
                          "sum its LoRAs or prompts with Average / WeightedSum instead")
    if isinstance(source, Block):
        return weighted_sum([_one_module(s, model, registry) for s in source.sources], source.weights)
    return load_single(source, model.base, registry)


def _names(model: ModularModel, name: str) -> Iterator[str]:
    candidates = (name if i == 0 else f"{name}-{i}" for i in range(10**6))
    return (n for n in candidates if n not in model.adapters)
