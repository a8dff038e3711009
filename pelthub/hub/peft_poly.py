"""Poly / MHR weights in PEFT's layout (`peft.tuners.poly`), both ways.

PEFT keeps, per adapted nn.Linear, `poly_lora_A` (h, K, in/h, r), `poly_lora_B` (h, K, r, out/h)
and `poly_router.module_logits` (T, h·K), the same layouts as pelthub, and scales the update by
1/r. pelthub scales by α/r, so B is multiplied by α on the way out (and α = 1 on the way in).
A routing matrix shared per block or per model is written once per layer. Fixed routing is
written as logits PEFT turns into the same eval weights: hard one-hot as ±1e4 (σ gives exactly
1 and 0), uniform as 0. Keys follow `get_peft_model_state_dict`:
`base_model.model.<site>.poly_lora_A`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigError, ModuleFormatError
from ..modules.base import site_key, site_name
from ..routing.poly import Poly, PolyModule, poly_module

PREFIX = "base_model.model."
HARD_LOGIT = 1e4
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<site>.+?)\.(?P<what>poly_lora_A|poly_lora_B|poly_router)(?:\..+)?$")


def routing_logits(module: PolyModule, key: str) -> torch.Tensor:
    """Logits (T, h·K) whose eval routing (σ, normalised per head) equals the module's for one layer."""
    c = module.config
    if c.variant in ("poly", "z"):
        return module.router[module.groups[key]].detach().clone()
    if c.variant == "mu":
        return torch.zeros(len(c.tasks), c.heads * c.skills)
    eye = torch.eye(len(c.tasks), c.skills).repeat(1, c.heads)
    return (2 * eye - 1) * HARD_LOGIT


def to_peft_config(model: nn.Module, **kwargs: Any) -> Any:
    """A `peft.PolyConfig` for the model's Poly module (extra kwargs go to PolyConfig, e.g. task_type)."""
    from peft import PolyConfig
    module = poly_module(model)
    c = module.config
    base = getattr(model, "base", None)
    for key in module.layers if base is not None else ():
        if not isinstance(base.get_submodule(site_name(key)), nn.Linear):
            raise ConfigError(f"PEFT's Poly adapts nn.Linear layers only; {site_name(key)} is "
                              f"{type(base.get_submodule(site_name(key))).__name__}")
    return PolyConfig(r=c.rank, target_modules=[site_name(k) for k in module.layers], n_tasks=len(c.tasks),
                      n_skills=c.skills, n_splits=c.heads, **kwargs)


@torch.no_grad()
def to_peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's Poly weights as PEFT keys and tensors (load with `set_peft_model_state_dict`)."""
    module = poly_module(model)
    state = {}
    for key, layer in module.layers.items():
        site = PREFIX + site_name(key)
        state[f"{site}.poly_router.module_logits"] = routing_logits(module, key)
        state[f"{site}.poly_lora_A"] = layer.lora_a.detach().clone()
        state[f"{site}.poly_lora_B"] = layer.lora_b.detach() * module.config.alpha
    return state


def from_peft_state_dict(state: Mapping[str, torch.Tensor], peft_config: Any,
                         tasks: tuple[str, ...] | None = None) -> tuple[Poly, dict[str, torch.Tensor]]:
    """A Poly config and the PolyModule state dict for PEFT Poly weights.

    `peft_config` is a PolyConfig or its dict; tasks default to "0" … "T−1". Use:
    `model = ph.compose(base, cfg); poly_module(model).load_state_dict(sd)`.
    """
    cfg = peft_config if isinstance(peft_config, Mapping) else peft_config.__dict__
    sites: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match:
            sites.setdefault(match["site"], {})[match["what"]] = tensor
    incomplete = [s for s, parts in sites.items() if len(parts) != 3]
    if not sites or incomplete:
        raise ModuleFormatError(f"PEFT Poly state dict needs poly_lora_A, poly_lora_B and poly_router per layer; "
                                f"incomplete layers: {incomplete[:3] or 'no Poly keys found'}")
    # taken as given, never cast (int(1.9) would be 1): Poly refuses what is not an integer in range
    config = Poly(tasks=tasks or cfg.get("n_tasks"), skills=cfg.get("n_skills"), rank=cfg.get("r"),
                  heads=cfg.get("n_splits"), targets=tuple(sites), alpha=1.0)
    ours: dict[str, torch.Tensor] = {}
    for site, parts in sites.items():
        key = site_key(site)
        ours[f"layers.{key}.lora_a"] = parts["poly_lora_A"]
        ours[f"layers.{key}.lora_b"] = parts["poly_lora_B"]
        ours[f"router.{key}"] = parts["poly_router"]
    return config, ours
