"""DSEE (Chen et al. 2021, "Dually Sparsity-Embedded Efficient Tuning"): a low-rank plus a sparse update.

    W' = W + (α/r) · (B·A + S ⊙ M_Ω),   A ∈ R^{r×in} ~ N(0, 0.02²),  B = 0,  S zero on Ω

S trains only on a fixed support Ω of N entries chosen from the pretrained W, where W is least
explained by a low-rank approximation. DSEE's code runs GreBsmo (W ≈ UV + S by alternating QR,
rank grown step by step, S hard-thresholded at 0.01); pelthub takes the simpler documented
version: L = the rank-r truncated SVD of W (the best rank-r approximation, which GreBsmo's
alternating QR approaches), and Ω = the N largest |W − L| (GreBsmo's 0.01 threshold only drops
entries these N outrank). S is stored as its N values on Ω and Ω as their (row, column)
positions, so S cannot leave Ω: no mask has to be re-applied after an optimizer step.

With N = 0 DSEE is LoRA with A ~ N(0, 0.02²). The update is linear, so it merges exactly.
`prune(base, ratio)` is DSEE's second stage: global magnitude pruning of the merged weights
W + ΔW over every adapted layer; each layer then computes M ⊙ (W + ΔW), and A, B, S go on
training with the masks fixed. The ratio is recorded in the config (`pruned`) and the masks M are
saved with the module (0/1 tensors, never trained), so a pruned module reloads pruned;
`merge_and_unload` writes M ⊙ (W + ΔW). A config with `pruned` set prunes the pretrained W
(ΔW = 0) when first attached.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..sites import Sites, linear_dims
from .base import CallContext, Handle, PeltModule, fuse_into_output, is_conv1d, site_key, site_name
from .config import MAX_SIZE, ModuleConfig, positive_int, positive_number, probability, targets
from .lora import LoRALinear


@dataclass(frozen=True)
class DSEE(ModuleConfig):
    """Config of DSEE.

    r, alpha: the low-rank part's rank and scale numerator (update scaled by alpha / r, sparse part too).
    support: N, the entries of S per layer (0: plain LoRA). targets: as for LoRA (default q and v).
    pruned: the fraction of W + ΔW pruned by magnitude (DSEE's stage 2 uses 0.2); 0: none.
    """

    kind: ClassVar[str] = "dsee"
    r: int = 16
    alpha: float = 32.0
    support: int = 16
    pruned: float = 0.0
    targets: tuple[str, ...] | None = None

    def validate(self) -> None:
        positive_int("DSEE", "r", self.r)
        positive_number("DSEE", "alpha", self.alpha)
        if self.support != 0:
            positive_int("DSEE", "support", self.support, MAX_SIZE * MAX_SIZE)
        targets("DSEE", self.targets)
        probability("DSEE", "pruned", self.pruned)

    def build(self, base: nn.Module, sites: Sites, init: bool = True, **_: object) -> "DSEEModule":
        names = dict.fromkeys(n for found in sites.resolve(self.targets or sites.default_targets("lora"),
                                                           linear=True, what="DSEE").values() for n in found)
        layers = {}
        for name in names:
            in_features, out_features = linear_dims(sites.names[name])
            if self.support > in_features * out_features:
                raise ConfigError(f"DSEE.support={self.support} is more entries than {name} has "
                                  f"({out_features}×{in_features}); choose at most {in_features * out_features}")
            layer = DSEELinear(in_features, out_features, self.r, self.alpha, self.support, self.pruned > 0)
            if init:
                layer.choose_support(weight_of(sites.names[name]))
            layers[name] = layer
        module = DSEEModule(self, layers)
        if init and self.pruned:
            module.prune(base, self.pruned)
        return module


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight in nn.Linear layout (out, in), for Conv1D too."""
    return module.weight.T if is_conv1d(module) else module.weight


def sparse_support(weight: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    """(n, 2) (row, column) of the n largest |W − L|, L the rank-`rank` truncated SVD of W (out, in)."""
    w = weight.detach().float().cpu()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    k = min(rank, s.shape[0])
    residual = w - (u[:, :k] * s[:k]) @ vh[:k]
    flat = residual.abs().flatten().topk(n).indices
    return torch.stack([flat // w.shape[1], flat % w.shape[1]], dim=1)


class DSEELinear(nn.Module):
    """The update of one linear layer: a LoRA (`lora`) plus S's `values` at positions `support`."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, n: int, pruned: bool = False):
        super().__init__()
        self.lora = LoRALinear(in_features, out_features, r, alpha)
        nn.init.normal_(self.lora.lora_a, std=0.02)
        self.values = nn.Parameter(torch.zeros(n))
        # (row, column) of Ω, float so it saves with the module tensors (exact below 2**24); never trained
        self.support = nn.Parameter(torch.zeros(n, 2), requires_grad=False)
        # the stage-2 pruning mask M (out, in) of W + ΔW, 1 = kept; float to save with the module; never trained
        self.keep = nn.Parameter(torch.ones(out_features, in_features), requires_grad=False) if pruned else None

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.support.long()
        return index[:, 0], index[:, 1]

    @torch.no_grad()
    def choose_support(self, weight: torch.Tensor) -> None:
        if self.values.numel():
            self.support.copy_(sparse_support(weight, self.lora.lora_a.shape[0], self.values.numel()))

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out + (α/r)·(B·A + S)·x; S·x gathers the N inputs Ω reads and adds them into the N outputs."""
        out = self.lora.add_to(out, x)
        if self.values.numel() == 0:
            return out
        rows, cols = self.rows_cols()
        contribution = x.to(self.values.dtype).index_select(-1, cols) * (self.values * self.lora.scale)
        sparse = contribution.new_zeros(*contribution.shape[:-1], out.shape[-1]).index_add(-1, rows, contribution)
        return out + sparse.to(out.dtype)

    def sparse_weight(self) -> torch.Tensor:
        """S ⊙ M_Ω as a dense (out, in) matrix."""
        rows, cols = self.rows_cols()
        dense = self.values.new_zeros(self.lora.lora_b.shape[0], self.lora.lora_a.shape[1])
        return dense.index_put((rows, cols), self.values, accumulate=True)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r)·(B·A + S ⊙ M_Ω) in nn.Linear layout (out, in)."""
        return self.lora.delta_weight() + self.sparse_weight() * self.lora.scale


class DSEEModule(PeltModule):
    def __init__(self, config: DSEE, layers: dict[str, DSEELinear]):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict({site_key(n): layer for n, layer in layers.items()})

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        return [fuse_into_output(base.get_submodule(site_name(k)), self._update(base, k), ctx)
                for k in self.layers]

    def _update(self, base: nn.Module, key: str):
        layer, target = self.layers[key], base.get_submodule(site_name(key))

        def update(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            out = layer.add_to(out, x)
            if layer.keep is None:
                return out
            # pruned: the layer computes M ⊙ (W + ΔW), so the dropped entries' share leaves the output
            dropped = (weight_of(target).to(layer.values.dtype) + layer.delta_weight()) * (1 - layer.keep)
            return out - (x.to(dropped.dtype) @ dropped.T).to(out.dtype)
        return update

    @torch.no_grad()
    def prune(self, base: nn.Module, ratio: float) -> None:
        """Stage 2: drop the fraction `ratio` of the entries of W + ΔW with the smallest magnitude, over all
        adapted layers at once (the masks stay fixed from here on, and replace any earlier ones)."""
        config = self.config.replace(pruned=ratio)  # validates the ratio before anything changes
        merged = {k: (weight_of(base.get_submodule(site_name(k))).float() + layer.delta_weight()).abs()
                  for k, layer in self.layers.items()}
        every = torch.cat([m.flatten() for m in merged.values()])
        count = int(round(ratio * every.numel()))
        threshold = every.kthvalue(max(count, 1)).values
        for k, layer in self.layers.items():
            layer.keep = nn.Parameter((merged[k] > threshold).float(), requires_grad=False) if count else None
        self.config = config

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        for key, layer in self.layers.items():
            target = base.get_submodule(site_name(key))
            weight = weight_of(target)
            merged = weight + layer.delta_weight().to(weight.dtype)
            if layer.keep is not None:
                merged = merged * layer.keep
            weight.copy_(merged)
