"""Updates of a mixture-of-experts block's fused expert weights (transformers 5: [E, out, in] parameters).

The experts of an MoE block are slices of one 3-D parameter, not modules, so no forward hook
reaches one expert. An update is therefore a parametrisation of the whole tensor, W ↦ f(W) with
f acting on every expert at once; every experts implementation (the eager loop, grouped or
batched matmuls) reads the parametrised tensor, and the router, which reads its own weight, is
untouched. f is computed once per call (the call's scratch), not once per expert the loop reads.

A weight update applies to the whole batch, so per-example selection (`adapter_names=`,
`set_adapter`) is refused while such an update is attached.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import RoutingError
from .base import CallContext, Handle


class ExpertLoRA(nn.Module):
    """One low-rank update per expert: W_e + (α/r)·B_e·A_e, A ∈ R^{E×r×in} (kaiming), B ∈ R^{E×out×r} (zero)."""

    def __init__(self, experts: int, out_features: int, in_features: int, r: int, alpha: float):
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(experts, r, in_features))
        self.lora_b = nn.Parameter(torch.zeros(experts, out_features, r))
        for a in self.lora_a:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.scale = alpha / r

    def delta_weight(self) -> torch.Tensor:
        """ΔW [E, out, in], the experts' own layout."""
        return torch.bmm(self.lora_b, self.lora_a) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight().to(weight.dtype)


class ExpertScale(nn.Module):
    """(IA)³ per expert: l_e ⊙ (W_e x) scales W_e's rows; W_e (l_e ⊙ x) (`on_input`) scales its columns."""

    def __init__(self, experts: int, size: int, on_input: bool):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(experts, size))
        self.on_input = on_input

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(weight.dtype)
        return weight * (scale[:, None, :] if self.on_input else scale[:, :, None])


def fused_weight(base: nn.Module, name: str) -> torch.Tensor:
    """The stored fused expert tensor `name` (`module.param`) of `base`, under any parametrisation."""
    module_name, _, param = name.rpartition(".")
    module = base.get_submodule(module_name)
    if parametrize.is_parametrized(module, param):
        return module.parametrizations[param].original
    return getattr(module, param)


class _Reparametrize(nn.Module):
    """Parametrisation W ↦ update(W), computed once per bound call; the update lives in its PeltModule
    (a list keeps it out of the base's parameters)."""

    def __init__(self, update: nn.Module, ctx: CallContext):
        super().__init__()
        self._update, self._ctx = [update], ctx

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        state = self._ctx.current()
        if state is not None and state.selected is not None:
            raise RoutingError("expert-weight updates (LoRA / IA3 on a mixture-of-experts' fused experts) apply "
                               "to the whole batch, so adapter_names= / set_adapter cannot select them per "
                               "example; call without selection, or target the attention projections")
        if self._ctx.selecting:  # the bare base (`disable_adapter`)
            return weight
        scratch = self._ctx.scratch(self)
        if "weight" not in scratch or scratch["base"] is not weight:
            scratch["base"], scratch["weight"] = weight, self._update[0](weight)
        return scratch["weight"]


class _RemoveOwn:
    """Handle removing one parametrisation of a tensor, leaving any other module's on it in place."""

    def __init__(self, module: nn.Module, param: str, mine: nn.Module):
        self.module, self.param, self.mine = module, param, mine

    def remove(self) -> None:
        if not parametrize.is_parametrized(self.module, self.param):
            return
        stack = self.module.parametrizations[self.param]
        if len(stack) == 1 and stack[0] is self.mine:
            parametrize.remove_parametrizations(self.module, self.param, leave_parametrized=False)
            return
        for i, p in enumerate(stack):
            if p is self.mine:
                del stack[i]
                return


def install_expert_update(base: nn.Module, name: str, update: nn.Module, ctx: CallContext) -> Handle:
    """Parametrise the fused expert parameter `name` (`module.param`) of `base` by `update`."""
    module_name, _, param = name.rpartition(".")
    module = base.get_submodule(module_name)
    mine = _Reparametrize(update, ctx)
    parametrize.register_parametrization(module, param, mine, unsafe=True)
    return _RemoveOwn(module, param, mine)


@torch.no_grad()
def merge_expert_update(base: nn.Module, name: str, update: nn.Module) -> None:
    """Write update(W) into the (unparametrised) fused expert parameter `name`."""
    weight = fused_weight(base, name)
    weight.copy_(update(weight))
