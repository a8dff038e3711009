"""Compacter (Karimi Mahabadi et al. 2021): adapters whose projections are PHM layers.

Each projection W ∈ R^{in×out} is a sum of Kronecker products

    W = Σ_{i=1..n} A_i ⊗ (s_i t_iᵀ),   A_i ∈ R^{n×n},  s_i ∈ R^{in/n},  t_i ∈ R^{out/n}

The "slow" A_i are shared by every adapter of the model (one set for the down
projections, one for the up projections); the "fast" rank-1 factors are per
layer. The up projections' t start at zero, so a fresh Compacter changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..sites import Sites
from .bottleneck import ACTIVATIONS, AdapterModule, adapter_sites
from .config import ModuleConfig, one_of, positive_int


@dataclass(frozen=True)
class Compacter(ModuleConfig):
    """Config of Compacter adapters.

    n: number of Kronecker summands (hidden and bottleneck sizes must be divisible by n).
    reduction: hidden size / bottleneck size. placement: "houlsby" (Compacter) or
    "pfeiffer" (Compacter++, one adapter after the FFN). activation: as for Bottleneck.
    """

    kind: ClassVar[str] = "compacter"
    n: int = 4
    reduction: int = 16
    placement: str = "houlsby"
    activation: str = "swish"

    def validate(self) -> None:
        positive_int("Compacter", "n", self.n)
        positive_int("Compacter", "reduction", self.reduction)
        one_of("Compacter", "placement", self.placement, ("houlsby", "pfeiffer"))
        one_of("Compacter", "activation", self.activation, ACTIVATIONS)

    def build(self, base: nn.Module, sites: Sites, **_: object) -> "CompacterModule":
        d = sites.geometry.hidden
        k = d // self.reduction if d % self.reduction == 0 else 0
        if k == 0 or d % self.n or k % self.n:
            raise ConfigError(
                f"Compacter needs the hidden size ({d}) divisible by reduction ({self.reduction}) and both "
                f"the hidden size and the bottleneck ({d}/{self.reduction}) divisible by n ({self.n}); "
                "choose n or reduction accordingly"
            )
        slow = SlowWeights(self.n)
        pairs = adapter_sites(sites, self.placement, "Compacter")
        return CompacterModule(self, slow, {p: CompacterLayer(slow, d, k, self.activation) for p in pairs})


class SlowWeights(nn.Module):
    """The shared A_i: (n, n, n) for the down and for the up projections, N(0, 0.01²)."""

    def __init__(self, n: int):
        super().__init__()
        self.down = nn.Parameter(torch.randn(n, n, n) * 0.01)
        self.up = nn.Parameter(torch.randn(n, n, n) * 0.01)


def kron_sum(a: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Σ_i A_i ⊗ (s_i t_iᵀ) for a (n, n, n), s (n, p), t (n, q) → (n·p, n·q)."""
    n, p, q = a.shape[0], s.shape[1], t.shape[1]
    return torch.einsum("iab,ix,iy->axby", a, s, t).reshape(n * p, n * q)


class PHM(nn.Module):
    """x ↦ x · W + b with W = kron_sum(A, s, t); fast factors glorot-initialised."""

    def __init__(self, slow: nn.Parameter, n: int, d_in: int, d_out: int, zero: bool = False):
        super().__init__()
        self._slow = [slow]  # shared, owned by SlowWeights; a list keeps it out of this module's state
        self.s = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n, d_in // n)))
        self.t = nn.Parameter(torch.zeros(n, d_out // n) if zero else nn.init.xavier_uniform_(torch.empty(n, d_out // n)))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def weight(self) -> torch.Tensor:
        return kron_sum(self._slow[0], self.s, self.t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight() + self.bias


class CompacterLayer(nn.Module):
    """forward(h) = up(act(down(h))) with PHM projections."""

    def __init__(self, slow: SlowWeights, d: int, k: int, activation: str):
        super().__init__()
        n = slow.down.shape[0]
        self.down = PHM(slow.down, n, d, k)
        self.act = ACTIVATIONS[activation]()
        self.up = PHM(slow.up, n, k, d, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x.to(self.down.s.dtype))))


class CompacterModule(AdapterModule):
    def __init__(self, config: Compacter, slow: SlowWeights, layers: dict[tuple[str, str], nn.Module]):
        super().__init__(config, layers)
        self.slow = slow
