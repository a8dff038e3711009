"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; He et al. 2022).

    adapter(h) = s · up(act(down(h))),   down: d → d/reduction, up: d/reduction → d

Placements:
- "pfeiffer": one sequential adapter after the FFN output projection, before
  the residual and layer norm: h ← h + adapter(h).
- "houlsby": the same after the attention output projection as well.
- "parallel": adapter of the FFN *input* added to the FFN output:
  ffn(x) ← ffn(x) + adapter(x).

`up` starts at zero, so a fresh adapter leaves the model unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..sites import Sites
from .base import CallContext, Handle, PeltModule, add_to_output, site_key, site_name
from .config import ModuleConfig, one_of, positive_int, positive_number

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh,
}
PLACEMENTS = ("pfeiffer", "houlsby", "parallel")


@dataclass(frozen=True)
class Bottleneck(ModuleConfig):
    """Config of bottleneck adapters.

    placement: "pfeiffer" (after the FFN), "houlsby" (after attention and FFN) or
    "parallel" (beside the FFN). reduction: hidden size / bottleneck size.
    activation: one of relu, swish, silu, gelu, tanh. scale: s, the output multiplier
    (He et al. use 4 for the parallel adapter).
    """

    kind: ClassVar[str] = "bottleneck"
    placement: str = "pfeiffer"
    reduction: int = 16
    activation: str = "relu"
    scale: float = 1.0

    def validate(self) -> None:
        one_of("Bottleneck", "placement", self.placement, PLACEMENTS)
        positive_int("Bottleneck", "reduction", self.reduction)
        one_of("Bottleneck", "activation", self.activation, ACTIVATIONS)
        positive_number("Bottleneck", "scale", self.scale)

    def build(self, base: nn.Module, sites: Sites, **_: object) -> "AdapterModule":
        d = sites.geometry.hidden
        if d % self.reduction:
            raise ConfigError(f"Bottleneck.reduction={self.reduction} must divide the hidden size {d}")
        make = lambda: AdapterLayer(d, d // self.reduction, self.activation, self.scale)  # noqa: E731
        return AdapterModule(self, {pair: make() for pair in adapter_sites(sites, self.placement, "Bottleneck")})


def adapter_sites(sites: Sites, placement: str, what: str) -> list[tuple[str, str]]:
    """(input site, output site) pairs; equal for sequential adapters.

    For "parallel", the input site is the module whose first input is the FFN
    input and the output site the module whose output is the FFN output.
    """
    ffn_out = sites.require("ffn_out", f"{what}(placement={placement!r})")
    if placement == "parallel":
        ffn_in = sites.require("ffn_in", f"{what}(placement='parallel')")
        if len(ffn_in) != len(ffn_out):
            raise UnsupportedModelError(f"found {len(ffn_in)} FFN inputs but {len(ffn_out)} FFN outputs")
        return list(zip(ffn_in, ffn_out))
    outs = ffn_out if placement == "pfeiffer" else sorted(
        sites.require("o", f"{what}(placement='houlsby')") + ffn_out, key=list(sites.names).index)
    return [(n, n) for n in outs]


class AdapterLayer(nn.Module):
    """forward(x) = scale · up(act(down(x))); down ~ N(0, 0.02), up = 0, zero biases."""

    def __init__(self, d: int, bottleneck: int, activation: str, scale: float = 1.0):
        super().__init__()
        self.down = nn.Linear(d, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, d)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x.to(self.down.weight.dtype)))) * self.scale


class AdapterModule(PeltModule):
    """Adapters at (input site, output site) pairs; shared by Bottleneck and Compacter."""

    def __init__(self, config: ModuleConfig, layers: dict[tuple[str, str], nn.Module]):
        super().__init__()
        self.config = config
        self.pairs = list(layers)
        self.layers = nn.ModuleDict({site_key(out): layer for (_, out), layer in layers.items()})

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        handles: list[Handle] = []
        for src, dst in self.pairs:
            layer = self.layers[site_key(dst)]
            out_module = base.get_submodule(dst)
            if src != dst:
                handles.extend(_parallel_split(base.get_submodule(src), out_module, layer))
            elif self.config.placement == "parallel":
                handles.append(add_to_output(out_module, layer))   # ffn(x) + adapter(x)
            else:
                handles.append(_sequential(out_module, layer))     # h + adapter(h)
        return handles


def _sequential(module: nn.Module, layer: nn.Module) -> Handle:
    """h ← h + adapter(h) on the module's output."""
    def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + layer(out).to(out.dtype)
    return module.register_forward_hook(hook)


def _parallel_split(src: nn.Module, dst: nn.Module, layer: nn.Module) -> list[Handle]:
    """Parallel adapter where the FFN input and output are different modules (BERT, BART).

    The pre-hook on `src` keeps the FFN input; the hook on `dst`, which runs
    next in the same layer, adds the adapter of it and drops it again.
    """
    held: list[torch.Tensor] = []

    def keep(_m: nn.Module, args: tuple) -> None:
        held[:] = [args[0]]

    def add(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = held.pop()
        return out + layer(x).to(out.dtype)
    return [src.register_forward_pre_hook(keep), dst.register_forward_hook(add)]
