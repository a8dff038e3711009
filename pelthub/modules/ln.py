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

from ..errors import UnsupportedModelError
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
                refuse_offloaded(name, module)
                params = {p: t.shape for p, t in module.named_parameters(recurse=False) if p in ("weight", "bias")}
                shapes[name] = params
        return LNModule(self, shapes)


def refuse_offloaded(name: str, module: nn.Module) -> None:
    """A norm whose weights accelerate holds aside (`dispatch_model` offload, `cpu_offload`) has none to
    reparametrise: its AlignDevicesHook (accelerate's `_hf_hook`) loads them per call, by their own name."""
    if getattr(getattr(module, "_hf_hook", None), "offload", False):
        raise UnsupportedModelError(
            f"LN-tuning cannot train {name}: accelerate offloads its weights (device_map 'disk' or 'cpu' offload, "
            "cpu_offload), and it reparametrises them in place; keep the norms on a device (a device_map without "
            "offload for the layers holding them), or tune another kind (LoRA, IA3, prompts work on offloaded layers)")


class _AddDelta(nn.Module):
    """Parametrisation t ↦ t + Δ; Δ lives in LNModule's `deltas` (a list keeps it out of the base's
    parameters), looked up per call by its key: FSDP swaps the Parameter objects."""

    def __init__(self, deltas: nn.ParameterDict, key: str, ctx: CallContext):
        super().__init__()
        self._deltas, self._key, self._ctx = [deltas], key, ctx

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t if self._ctx.selecting else t + self._deltas[0][self._key].to(t.dtype)


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
            yield site_name(module_key), param, key, delta

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        handles = []
        for name, param, key, _ in self._targets():
            module = base.get_submodule(name)
            parametrize.register_parametrization(module, param, _AddDelta(self.deltas, key, ctx), unsafe=True)
            handles.append(_Unparametrize(module, param))
        return handles

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        for name, param, _, delta in self._targets():
            getattr(base.get_submodule(name), param).add_(delta.to(getattr(base.get_submodule(name), param).dtype))


class _Unparametrize:
    """Handle whose remove() restores the original tensor object."""

    def __init__(self, module: nn.Module, param: str):
        self.module, self.param = module, param

    def remove(self) -> None:
        if parametrize.is_parametrized(self.module, self.param):
            parametrize.remove_parametrizations(self.module, self.param, leave_parametrized=False)
