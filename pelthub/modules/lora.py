"""LoRA (Hu et al. 2021): a low-rank update added beside a frozen linear layer.

    y = W₀x + (α/r) · B · A · dropout(x),   A ∈ R^{r×in}, B ∈ R^{out×r}

A is kaiming-uniform, B is zero, so a fresh LoRA leaves the model unchanged.
Works on nn.Linear and GPT-2's Conv1D (weight [in, out], e.g. the fused c_attn), and on a
mixture-of-experts' fused 3-D expert weights: one update per expert (`modules.experts`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..sites import Sites, linear_dims
from .base import CallContext, Handle, PeltModule, fuse_into_output, is_conv1d, site_key, site_name
from .config import ModuleConfig, positive_int, positive_number, probability, targets
from .experts import ExpertLoRA, fused_weight, install_expert_update, merge_expert_update
from .grouped import lora_single


@dataclass(frozen=True)
class LoRA(ModuleConfig):
    """Config of a LoRA module.

    r: rank of the update. alpha: scale numerator (update scaled by alpha / r).
    The defaults r=8, alpha=16 give scale 2, twice PEFT's (LoraConfig's r=8,
    lora_alpha=8: scale 1); pass alpha=r for PEFT's scale. Exports to PEFT
    write the alpha used, so a module keeps its outputs either way.
    dropout: dropout on the LoRA input. targets: site roles ("q", "k", "v", "o",
    "up", "down", "gate", "qkv") or module-name suffixes; None = the family's
    attention query and value projections (GPT-2: the fused c_attn).
    """

    kind: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None

    def validate(self) -> None:
        positive_int("LoRA", "r", self.r)
        positive_number("LoRA", "alpha", self.alpha)
        probability("LoRA", "dropout", self.dropout)
        targets("LoRA", self.targets)

    def build(self, base: nn.Module, sites: Sites, **_: object) -> "LoRAModule":
        names = [n for found in sites.resolve(self.targets or sites.default_targets("lora"), linear=True,
                                              what="LoRA", experts=True).values() for n in found]
        fused = [n for n in dict.fromkeys(names) if n not in sites.names]
        if fused and self.dropout > 0:
            raise ConfigError(f"LoRA(dropout={self.dropout}) cannot drop the inputs of fused expert weights "
                              f"({fused[0]}, updated as weights, not hooked per input); use dropout=0 there")
        layers = {n: LoRALinear(*linear_dims(sites.names[n]), self.r, self.alpha, self.dropout)
                  for n in dict.fromkeys(names) if n in sites.names}
        experts = {n: ExpertLoRA(*fused_weight(base, n).shape, self.r, self.alpha) for n in fused}
        return LoRAModule(self, layers, experts)


class LoRALinear(nn.Module):
    """The update of one linear layer; forward(x) returns (α/r)·B·A·dropout(x)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.lora_a = nn.Parameter(torch.empty(r, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_a.dtype))
        return (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + forward(x), the add fused into the matmul (`grouped.lora_single`): no update-sized buffer."""
        return lora_single(out, self.dropout(x.to(self.lora_a.dtype)), self.lora_a, self.lora_b, self.scale)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in nn.Linear layout (out, in)."""
        return (self.lora_b @ self.lora_a) * self.scale


class LoRAModule(PeltModule):
    def __init__(self, config: LoRA, layers: dict[str, LoRALinear], experts: dict[str, ExpertLoRA] | None = None):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict({site_key(n): layer for n, layer in layers.items()})
        self.experts = nn.ModuleDict({site_key(n): update for n, update in (experts or {}).items()})

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        return ([fuse_into_output(base.get_submodule(site_name(k)), layer.add_to, ctx)
                 for k, layer in self.layers.items()] +
                [install_expert_update(base, site_name(k), update, ctx) for k, update in self.experts.items()])

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        for key, layer in self.layers.items():
            target = base.get_submodule(site_name(key))
            delta = layer.delta_weight()
            target.weight += (delta.T if is_conv1d(target) else delta).to(target.weight.dtype)
        for key, update in self.experts.items():
            merge_expert_update(base, site_name(key), update)


def top_right_singular(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The top right singular vector (in,) of ΔW = B·A, exactly, without forming ΔW: a LoRA's Arrow prototype.

    With Aᵀ = Q_a R_a and B = Q_b R_b (thin QR), ΔW = Q_b (R_b R_aᵀ) Q_aᵀ, so the SVD of the
    r×r core R_b R_aᵀ = U S Vᵀ gives ΔW's right singular vectors as Q_a V. Computed in float64.
    """
    qa, ra = torch.linalg.qr(a.double().T)
    qb, rb = torch.linalg.qr(b.double())
    _, _, vh = torch.linalg.svd(rb @ ra.T)
    return (qa @ vh[0]).to(a.dtype)
