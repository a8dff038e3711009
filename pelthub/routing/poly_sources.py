"""Trained LoRAs as Poly skills: what `Poly.from_modules` builds on.

LoRA k becomes skill k with A[:, k] = Aᵀ cut into heads and B[:, k] = Bᵀ·(scale_k / scale)
cut into heads, where scale = α/r of the Poly (α = r here, so scale = 1 and B carries each
LoRA's own α_k/r_k). The config stays data; the weights are the `skills=` build input.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..model import ModularModel
from ..modules.base import site_name
from ..modules.config import Sourced
from ..modules.lora import LoRAModule

if TYPE_CHECKING:
    from .poly import Poly

LoRAWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # site → (A (r, in), B·scale (out, r))


def over_modules(cls: type["Poly"], modules: Sequence[Any], tasks: Sequence[str] | None, variant: str,
                 heads: int, granularity: str, registry: Any, base: nn.Module | None) -> Sourced:
    """`Poly.from_modules`: the Poly config over the modules, with their weights as its `skills=` input."""
    if not modules:
        raise ConfigError("Poly.from_modules needs at least one LoRA module")
    named = [_lora_weights(m, registry, base) for m in modules]
    loras = [w for _, w in named]
    if tasks is None:
        tasks = [name or f"task{i}" for i, (name, _) in enumerate(named)]
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"Poly.from_modules: module names {tasks} repeat; pass tasks=[...]")
    sites = list(dict.fromkeys(s for lora in loras for s in lora))
    rank = max(a.shape[0] for lora in loras for a, _ in lora.values())
    config = cls(tasks=tuple(tasks), skills=len(loras), rank=rank, heads=heads, targets=tuple(sites),
                 granularity=granularity, alpha=float(rank), variant=variant)
    return Sourced(config, {"skills": loras})


def _lora_weights(source: Any, registry: Any, base: nn.Module | None) -> tuple[str | None, LoRAWeights]:
    """(name, weights) of a LoRAModule, a ModularModel holding one, or a registry ref."""
    if isinstance(source, str):
        if registry is None or base is None:
            raise ConfigError(f"Poly.from_modules: the registry ref {source!r} needs registry= (e.g. "
                              "pelthub.Registry()) and base= (the model to load it onto)")
        before = set(base.adapters) if isinstance(base, ModularModel) else set()
        loaded = registry.load(source, base, heads=False)
        try:
            return source, _lora_weights(loaded, None, None)[1]
        finally:  # the loaded copy must not stay hooked onto the base
            if isinstance(loaded, ModularModel):
                for name in [n for n in loaded.adapters if n not in before]:
                    loaded.remove(name)
    if isinstance(source, ModularModel):
        found = [(n, m) for n, s in source.adapters.items() for m in s.values() if isinstance(m, LoRAModule)]
        if len(found) != 1:
            raise ConfigError(f"Poly.from_modules: a model passed as a skill must hold exactly one LoRA, "
                              f"this one holds {len(found)}; pass its LoRA module (model.adapters[name]['lora'])")
        name, source = found[0]
        return name, _lora_weights(source, None, None)[1]
    if isinstance(source, LoRAModule):
        return None, {site_name(k): (l.lora_a.detach().clone(), (l.lora_b * l.scale).detach().clone())
                      for k, l in source.layers.items()}
    raise ConfigError(f"Poly.from_modules takes LoRA modules, models holding one LoRA, or registry refs; "
                      f"got {type(source).__name__}")
