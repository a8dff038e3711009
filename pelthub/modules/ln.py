"""LN-tuning (Qi et al. 2022): train only the layer norms' gains and biases.

Each norm's γ (and β when it has one) is reparameterised as γ₀ + Δγ through
`torch.nn.utils.parametrize`, with Δ starting at zero: the base tensors are
never written, the fresh module is exactly the identity, detaching removes
the parametrisation, and merging writes γ₀ + Δγ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..sites import Sites
from .base import CallContext, Handle, PeltModule, site_key, site_name
from .config import ModuleConfig


def is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or (name.endswith(("LayerNorm", "RMSNorm")) and hasattr(module, "weight"))


@dataclass(frozen=True)
class LNTuning(ModuleConfig):
    """Config of LN-tuning: every LayerNorm / RMSNorm of the base model becomes trainable."""

    kind: ClassVar[str] = "ln"

    def build(self, base: nn.Module, sites: Sites, **_: object) -> "LNModule":
        shapes = {}
        for name, module in sites.names.items():
            if is_norm(module) and isinstance(getattr(module, "weight", None), torch.Tensor):
                params = {p: t.shape for p, t in module.named_parameters(recurse=False) if p in ("weight", "bias")}
                shapes[name] = params
        return LNModule(self, shapes)


class _AddDelta(nn.Module):
    """Parametrisation t ↦ t + Δ; Δ lives in LNModule (a list keeps it out of the base's parameters)."""

    def __init__(self, delta: nn.Parameter):
        super().__init__()
        self._delta = [delta]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t + self._delta[0].to(t.dtype)


class LNModule(PeltModule):
    def __init__(self, config: LNTuning, shapes: dict[str, dict[str, torch.Size]]):
        super().__init__()
        self.config = config
        self.deltas = nn.ParameterDict({
            f"{site_key(name)}--{p}": nn.Parameter(torch.zeros(shape))
            for name, params in shapes.items() for p, shape in params.items()})

    def _targets(self):
        for key, delta in self.deltas.items():
            module_key, param = key.rsplit("--", 1)
            yield site_name(module_key), param, delta

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        handles = []
        for name, param, delta in self._targets():
            module = base.get_submodule(name)
            parametrize.register_parametrization(module, param, _AddDelta(delta), unsafe=True)
            handles.append(_Unparametrize(module, param))
        return handles

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        for name, param, delta in self._targets():
            getattr(base.get_submodule(name), param).add_(delta.to(getattr(base.get_submodule(name), param).dtype))


class _Unparametrize:
    """Handle whose remove() restores the original tensor object."""

    def __init__(self, module: nn.Module, param: str):
        self.module, self.param = module, param

    def remove(self) -> None:
        if parametrize.is_parametrized(self.module, self.param):
            parametrize.remove_parametrizations(self.module, self.param, leave_parametrized=False)
