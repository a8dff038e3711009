"""Prefix tuning (Li & Liang 2021): trainable keys and values before each layer's own.

Each attention layer ℓ gets K_p, V_p ∈ R^{heads×L×head_dim}, passed to the
model as a pre-filled `DynamicCache` (for encoder-decoder models, the decoder
self-attention cache). During training the prefix is reparameterised,

    P = Linear(hidden → 2·N·heads·head_dim)(tanh(Linear(d → hidden)(E))),  E ∈ R^{L×d},

and `collapse()` replaces the MLP by the tensor it computes. The flat layout
(L, 2·N·heads·head_dim), read as (L, 2N, heads, head_dim) with layer ℓ's key
at 2ℓ and value at 2ℓ+1, is PEFT's, so weights move between the two as is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..sites import Sites
from .base import CallContext, PeltModule
from .config import ModuleConfig, positive_int

MLP_LR_SCALE = 0.1  # learning rate of the reparameterisation MLP relative to the module lr (see Prefix)


@dataclass(frozen=True)
class Prefix(ModuleConfig):
    """Config of prefix tuning.

    length: virtual key/value positions L per layer. hidden: width of the
    reparameterisation MLP (Li & Liang use 512-800), or None for a direct tensor.

    The MLP keeps Li & Liang's default, but its parameters train at
    `MLP_LR_SCALE` (1/10) of the module learning rate in `pelthub.training.param_groups`:
    its last layer (hidden × 2·N·heads·head_dim, 512 × 4608 on MiniLM) moves every
    key and value at once, and under AdamW at a typical module lr (5e-3) it blows up
    within 40 steps (key std 0.27 → 3.28, every input gets one representation and the
    model predicts one class). Measured on MiniLM, 3 seeds: MLP at lr 5e-4 0.978,
    direct prefix (hidden=None) at lr 5e-3 0.991, MLP at 5e-3 0.332 (chance).
    """

    kind: ClassVar[str] = "prefix"
    length: int = 10
    hidden: int | None = 512

    def validate(self) -> None:
        positive_int("Prefix", "length", self.length)
        if self.hidden is not None:
            positive_int("Prefix", "hidden", self.hidden)

    def build(self, base: nn.Module, sites: Sites, **_: object) -> "PrefixModule":
        sites.prefix_layers("Prefix")  # raises, naming the sites, where attention takes no cache
        g = sites.geometry
        return PrefixModule(self, g.hidden, g.layers, g.kv_heads, g.head_dim)


class PrefixModule(PeltModule):
    def __init__(self, config: Prefix, d: int, layers: int, heads: int, head_dim: int):
        super().__init__()
        self.config = config
        self.shape = (layers, heads, head_dim)
        width = 2 * layers * heads * head_dim
        if config.hidden is None:
            self.values = nn.Parameter(torch.randn(config.length, width))
        else:
            self.embedding = nn.Parameter(torch.randn(config.length, d))
            self.mlp = nn.Sequential(nn.Linear(d, config.hidden), nn.Tanh(), nn.Linear(config.hidden, width))

    def lr_scales(self) -> list[tuple[str, float, list[nn.Parameter]]]:
        """(group, lr relative to the module lr, parameters): the MLP's own group (see `Prefix`)."""
        if self.config.hidden is None:
            return []
        return [("prefix_mlp", MLP_LR_SCALE, [self.embedding, *self.mlp.parameters()])]

    def flat(self) -> torch.Tensor:
        """(L, 2·N·heads·head_dim), computed by the MLP when not collapsed."""
        return self.values if self.config.hidden is None else self.mlp(self.embedding)

    def prefix(self, batch: int, ctx: CallContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return layer_pairs(self.flat().expand(batch, -1, -1), self.shape)

    @torch.no_grad()
    def collapse(self) -> None:
        """Drop the reparameterisation: keep only the prefix it computes (config.hidden → None)."""
        if self.config.hidden is None:
            return
        self.values = nn.Parameter(self.flat().detach().clone())
        del self.embedding, self.mlp
        self.config = self.config.replace(hidden=None)

    @torch.no_grad()
    def load_pairs(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set a collapsed prefix from per-layer (key, value) of shape (1, heads, L, head_dim)."""
        self.collapse()
        kv = torch.stack([t[0] for pair in pairs for t in pair])          # (2N, heads, L, hd)
        self.values.copy_(kv.permute(2, 0, 1, 3).reshape(self.values.shape))


def layer_pairs(flat: torch.Tensor, shape: tuple[int, int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (key, value), each (B, heads, L, head_dim), of prefixes flat (B, L, 2·N·heads·head_dim)."""
    layers, heads, head_dim = shape
    kv = flat.view(*flat.shape[:2], 2 * layers, heads, head_dim).permute(2, 0, 3, 1, 4)  # (2N, B, heads, L, hd)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]
