"""KAdaptation (He et al. 2023, "Parameter-efficient Model Adaptation for Vision Transformers").

Each adapted projection y = xW + b₀ (W ∈ R^{in×out}) becomes

    y = xW + b₀ + s · x·ΔW + b,   ΔW = Σ_{i=1..n} A_i ⊗ (u_i v_iᵀ),
    A_i ∈ R^{a×a},  u_i ∈ R^{in/a},  v_i ∈ R^{out/a}

The "slow" A_i are shared by every layer's projection of one target (all queries share one set,
all values another); the "fast" rank-1 factors u_i v_iᵀ and the bias b are per layer. A and u
start Glorot, v and b at zero, so ΔW = 0 and a fresh module leaves the model bit-exact. The
official code reuses the query's factors for the value branch and zero-initialises both u and v
(so no gradient ever reaches them); neither is reproduced here.

The update is linear: merging writes W + s·ΔW and b₀ + b. n = 1 is one Kronecker product,
PEFT's LoKr: export(format="peft") writes it as LoKr when b = 0 and every target shares one a
(mapping in pelthub/hub/peft_methods.py), and refuses it otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..sites import Sites, linear_dims
from .base import CallContext, Handle, PeltModule, fuse_into_output, is_conv1d, site_key, site_name
from .config import ModuleConfig, positive_int, positive_number, targets

DEFAULT_A = 32  # the paper's slow-weight size on ViT-B (d = 768); smaller where it does not divide the widths


@dataclass(frozen=True)
class KAdaptation(ModuleConfig):
    """Config of KAdaptation.

    n: Kronecker terms. a: size of the shared A_i, dividing the targets' widths; None picks the
    largest divisor up to 32 (the paper's a = 32 for d = 768). scale: s. targets: as for LoRA
    (default q and v).
    """

    kind: ClassVar[str] = "kadaptation"
    n: int = 32
    a: int | None = None
    scale: float = 1.0
    targets: tuple[str, ...] | None = None

    def validate(self) -> None:
        positive_int("KAdaptation", "n", self.n)
        if self.a is not None:
            positive_int("KAdaptation", "a", self.a)
        positive_number("KAdaptation", "scale", self.scale)
        targets("KAdaptation", self.targets)

    def build(self, base: nn.Module, sites: Sites, **_: object) -> "KAdaptationModule":
        found = sites.resolve(self.targets or sites.default_targets("lora"), linear=True, what="KAdaptation")
        slow, layers = nn.ParameterDict(), {}
        for target, names in found.items():
            widths = [w for name in names for w in linear_dims(sites.names[name])]
            a = self.a or max(k for k in range(1, DEFAULT_A + 1) if all(w % k == 0 for w in widths))
            if any(w % a for w in widths):
                raise ConfigError(f"KAdaptation.a={a} must divide the widths of the {target!r} targets "
                                  f"({sorted(set(widths))}); choose a divisor of all of them, or a=None")
            slow[site_key(target)] = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.n, a, a)))
            for name in names:
                in_features, out_features = linear_dims(sites.names[name])
                layers[name] = KroneckerUpdate(site_key(target), self.n, in_features // a, out_features // a, a,
                                               self.scale)
        return KAdaptationModule(self, slow, layers)


class KroneckerUpdate(nn.Module):
    """One layer's fast factors u (n, in/a), v (n, out/a) and bias b (out,); the slow A (n, a, a) is passed in."""

    def __init__(self, target: str, n: int, p: int, q: int, a: int, scale: float):
        super().__init__()
        self.target = target  # key of its slow weights in KAdaptationModule.slow
        self.u = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n, p)))
        self.v = nn.Parameter(torch.zeros(n, q))
        self.bias = nn.Parameter(torch.zeros(a * q))
        self.scale = scale

    def delta(self, slow: torch.Tensor) -> torch.Tensor:
        """ΔW = Σ_i A_i ⊗ (u_i v_iᵀ), (in, out): entry (α·p + x, β·q + y) is Σ_i A_i[α, β] u_i[x] v_i[y]."""
        a, (p, q) = slow.shape[1], (self.u.shape[1], self.v.shape[1])
        return torch.einsum("iab,ix,iy->axby", slow, self.u, self.v).reshape(a * p, a * q)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, slow: torch.Tensor) -> torch.Tensor:
        """out + s·x·ΔW + b."""
        update = x.to(self.u.dtype) @ self.delta(slow) * self.scale + self.bias
        return out + update.to(out.dtype)


class KAdaptationModule(PeltModule):
    def __init__(self, config: KAdaptation, slow: nn.ParameterDict, layers: dict[str, KroneckerUpdate]):
        super().__init__()
        self.config = config
        self.slow = slow
        self.layers = nn.ModuleDict({site_key(n): layer for n, layer in layers.items()})

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        return [fuse_into_output(base.get_submodule(site_name(k)),
                                 lambda out, x, layer=layer: layer.add_to(out, x, self.slow[layer.target]), ctx)
                for k, layer in self.layers.items()]

    def check_merge(self, base: nn.Module) -> None:
        for key, layer in self.layers.items():
            if base.get_submodule(site_name(key)).bias is None and layer.bias.any():
                raise ConfigError(f"KAdaptation's bias at {site_name(key)} cannot merge: that layer has no bias; "
                                  "keep the module attached, or train it with the bias at zero")

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        self.check_merge(base)  # every check before the first write
        for key, layer in self.layers.items():
            target = base.get_submodule(site_name(key))
            delta = layer.delta(self.slow[layer.target]) * layer.scale        # (in, out)
            target.weight += (delta if is_conv1d(target) else delta.T).to(target.weight.dtype)
            if target.bias is not None:
                target.bias += layer.bias.to(target.bias.dtype)
