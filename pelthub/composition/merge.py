"""Merging LoRA modules into one plain LoRA.

For sources i = 1..K with factors Aᵢ (rᵢ × in), Bᵢ (out × rᵢ), scale sᵢ = αᵢ/rᵢ
and weights wᵢ, at every adapted site:

- "cat":    A = [A₁; …; A_K], B = [w₁s₁B₁, …, w_K s_K B_K]   → BA = Σᵢ wᵢ sᵢ BᵢAᵢ, exact, rank Σrᵢ.
- "linear": A = Σᵢ wᵢAᵢ, B = Σᵢ wᵢ sᵢ Bᵢ (LoraHub's element-wise combination). This mixes
            factors: BA = Σᵢⱼ wᵢwⱼ sᵢ BᵢAⱼ has cross terms, so it is not the weighted sum of
            the deltas (equal to it only for K = 1 or orthogonal factors). Needs equal ranks.
- "svd":    ΔW = Σᵢ wᵢ sᵢ BᵢAᵢ, then its best rank-`rank` approximation (truncated SVD),
            B = U_k √S_k, A = √S_k V_kᵀ. Exact when rank ≥ Σrᵢ.
- "ties":   TIES merging (Yadav et al. 2023) of the deltas τᵢ = sᵢBᵢAᵢ: keep each τᵢ's top
            `density` fraction of entries by magnitude, weight by wᵢ, elect the sign of the sum
            per entry, average the weighted entries that agree with it (disjoint mean), then
            truncated SVD to `rank`.

The result is a `LoRAModule` with scale 1 (α = r) that attaches like any module:
`ph.compose(base, merged)`; `model.save_pretrained(dir)` then saves it.

`merge_prefixes` is prefix merging: prefixes trained on related tasks averaged (P = Σᵢ wᵢPᵢ
over their (L, 2·N·heads·head_dim) key/value tensors) into one direct prefix, the start of
few-shot tuning on a new target task.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError, IncompatibleModuleError
from ..model import ModularModel
from ..modules.base import site_name
from ..modules.config import finite_numbers, positive_int
from ..modules.lora import LoRA, LoRALinear, LoRAModule
from ..modules.prefix import Prefix, PrefixModule
from .blocks import Source, load_single

METHODS = ("linear", "cat", "svd", "ties")
Factors = tuple[torch.Tensor, torch.Tensor]


def merge(modules: Sequence[Source], weights: Sequence[float] | None = None, method: str = "linear",
          rank: int | None = None, density: float = 0.2, base: nn.Module | None = None,
          registry: Any = None) -> LoRAModule:
    """One plain LoRA from weighted LoRA modules (see the module docstring for the methods).

    modules: LoRA sources (LoRAModule, ModularModel holding one LoRA, saved directory or
    registry ref; the last two need `base`). weights: one per module, default 1/K.
    rank: target rank of "svd" and "ties" (default the largest source rank).
    """
    loras = lora_sources(modules, base, registry)
    weights = check_weights(weights, len(loras))
    if method not in METHODS:
        raise ConfigError(f"merge method must be one of {list(METHODS)}, got {method!r}")
    ranks = {m.config.r for m in loras}
    if method == "linear" and len(ranks) > 1:
        raise ConfigError(f"method='linear' adds factors elementwise and needs equal ranks, got {sorted(ranks)}; "
                          "use method='cat' (exact) or 'svd'")
    if method in ("svd", "ties") and rank is not None:
        positive_int("merge", "rank", rank)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ConfigError(f"merge density must be a number in (0, 1], got {density!r:.80}")
    target = {"cat": sum(m.config.r for m in loras), "linear": loras[0].config.r}.get(method, rank or max(ranks))
    merged = merged_module(loras, target)
    load_factors(merged, merge_factors(loras, torch.tensor(weights), method, target, density))
    return merged


def lora_sources(modules: Sequence[Source], base: nn.Module | None, registry: Any = None) -> list[LoRAModule]:
    """Resolve sources to LoRA modules adapting the same sites with the same shapes."""
    loras = one_base_sources(modules, "LoRA", base, registry)
    kinds = [m.config.kind for m in loras]
    if any(k != "lora" for k in kinds):
        raise ConfigError(f"merge takes LoRA modules only, got kinds {kinds}")
    if any(len(m.experts) for m in loras):
        raise ConfigError("merge combines LoRA factors of linear layers; updates of fused expert weights (MoE) "
                          "are not merged: merge modules trained on linear targets only")
    first = {k: tuple(layer.lora_a.shape[1:]) + tuple(layer.lora_b.shape[:1]) for k, layer in loras[0].layers.items()}
    for i, m in enumerate(loras[1:], 1):
        shapes = {k: tuple(layer.lora_a.shape[1:]) + tuple(layer.lora_b.shape[:1]) for k, layer in m.layers.items()}
        if shapes.keys() != first.keys():
            diff = sorted(map(site_name, set(shapes) ^ set(first)))
            raise IncompatibleModuleError(f"LoRA module {i} adapts other sites than module 0 (differing: {diff[:4]}); "
                                          "merge modules trained with the same targets")
        if shapes != first:
            raise IncompatibleModuleError(f"LoRA module {i} has other layer sizes than module 0: they were trained on "
                                          "different base models")
    return loras


def one_base_sources(modules: Sequence[Source], kind: str, base: nn.Module | None, registry: Any) -> list[Any]:
    """The one module of each source, refusing none at all and sources attached to different bases."""
    if not modules:
        raise ConfigError(f"merge needs at least one {kind} module")
    bases = {m.sites.fingerprint()["sha256"] for m in modules if isinstance(m, ModularModel)}
    if len(bases) > 1:
        raise IncompatibleModuleError(f"the {kind} modules were trained on base models of different architectures; "
                                      "merge modules of one base model")
    return [load_single(m, base, registry) for m in modules]


def merge_prefixes(modules: Sequence[Source], weights: Sequence[float] | None = None, base: nn.Module | None = None,
                   registry: Any = None) -> PrefixModule:
    """One direct prefix (`Prefix(hidden=None)`), P = Σᵢ wᵢPᵢ, from prefixes of one length at the same layers.

    modules: prefix sources (PrefixModule, ModularModel holding one prefix, saved directory or
    registry ref; the last two need `base`). weights: one per module, default 1/K. A source
    still carrying its reparameterisation MLP counts with the prefix its MLP computes. The
    result is trainable: attach it (`ph.compose(base, merged)`) and unfreeze it to tune few-shot.
    """
    prefixes = one_base_sources(modules, "prefix", base, registry)
    kinds = [m.config.kind for m in prefixes]
    if any(k != "prefix" for k in kinds):
        raise ConfigError(f"merge_prefixes takes prefix modules only, got kinds {kinds}")
    w = torch.tensor(check_weights(weights, len(prefixes)))
    first = prefixes[0]
    for i, m in enumerate(prefixes[1:], 1):
        if m.shape != first.shape:
            raise IncompatibleModuleError(f"prefix {i} sits at (layers, heads, head_dim) {m.shape}, prefix 0 at "
                                          f"{first.shape}: they were trained on different base models; "
                                          "merge prefixes of one base")
        if m.config.length != first.config.length:
            raise IncompatibleModuleError(f"prefix {i} has length {m.config.length}, prefix 0 {first.config.length}; "
                                          "merge prefixes of one length")
    # d (the MLP's input width) is unused: a direct prefix has no MLP
    merged = PrefixModule(Prefix(length=first.config.length, hidden=None), 0, *first.shape)
    with torch.no_grad():
        flats = torch.stack([m.flat().float() for m in prefixes])
        merged.values.copy_(torch.einsum("k,klw->lw", w.to(flats.dtype), flats))
    return merged


def check_weights(weights: Sequence[float] | None, k: int) -> list[float]:
    if weights is None:
        return [1.0 / k] * k
    return list(finite_numbers("merge", "weights", weights, k, "one weight per module"))


def merged_module(loras: list[LoRAModule], rank: int) -> LoRAModule:
    """An empty LoRA of `rank` and scale 1 at the sources' sites."""
    c = loras[0].config
    config = LoRA(r=rank, alpha=float(rank), dropout=c.dropout, targets=c.targets)
    layers = {site_name(k): LoRALinear(layer.lora_a.shape[1], layer.lora_b.shape[0], rank, float(rank))
              for k, layer in loras[0].layers.items()}
    return LoRAModule(config, layers)


@torch.no_grad()
def load_factors(module: LoRAModule, factors: dict[str, Factors]) -> None:
    for key, (a, b) in factors.items():
        module.layers[key].lora_a.copy_(a)
        module.layers[key].lora_b.copy_(b)


def merge_factors(loras: list[LoRAModule], weights: torch.Tensor, method: str, rank: int,
                  density: float = 0.2) -> dict[str, Factors]:
    """Merged (A, B) per site key, for scale 1."""
    return {key: merge_site([m.layers[key] for m in loras], weights, method, rank, density)
            for key in loras[0].layers}


def merge_site(layers: list[LoRALinear], w: torch.Tensor, method: str, rank: int, density: float) -> Factors:
    a_s = [layer.lora_a.detach() for layer in layers]
    b_s = [layer.lora_b.detach() * layer.scale for layer in layers]
    w = w.to(a_s[0].dtype)
    if method == "cat":
        return torch.cat(a_s, 0), torch.cat([wi * b for wi, b in zip(w, b_s)], 1)
    if method == "linear":
        return sum(wi * a for wi, a in zip(w, a_s)), sum(wi * b for wi, b in zip(w, b_s))
    deltas = torch.stack([b @ a for a, b in zip(a_s, b_s)])
    delta = torch.einsum("k,koi->oi", w, deltas) if method == "svd" else ties(deltas, w, density)
    return low_rank(delta, rank)


def ties(deltas: torch.Tensor, w: torch.Tensor, density: float) -> torch.Tensor:
    """TIES: trim each (K, out, in) delta to its top-density entries, weight, elect sign, disjoint mean."""
    flat = deltas.flatten(1).abs()
    keep = max(1, int(density * flat.shape[1]))
    threshold = flat.kthvalue(flat.shape[1] - keep + 1, dim=1).values.view(-1, 1, 1)
    weighted = torch.where(deltas.abs() >= threshold, deltas, torch.zeros_like(deltas)) * w.view(-1, 1, 1)
    sign = torch.sign(weighted.sum(0))
    agree = (torch.sign(weighted) == sign) & (weighted != 0)
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)


def low_rank(delta: torch.Tensor, rank: int) -> Factors:
    """(A, B) with B·A the best rank-`rank` approximation of delta (out, in); zero-padded if rank is larger."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    a, b = delta.new_zeros(rank, delta.shape[1]), delta.new_zeros(delta.shape[0], rank)
    a[:k], b[:, :k] = root[:, None] * vh[:k], u[:, :k] * root
    return a, b
