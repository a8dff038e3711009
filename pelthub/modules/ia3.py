"""(IA)³ (Liu et al. 2022): learned vectors that rescale activations.

    attention targets:   y = l ⊙ (W x)          (e.g. keys and values)
    feed-forward target: y = W (l ⊙ x)          (the FFN's second projection's input)

The vectors start at one, which is the identity; merging scales the rows (or,
for feed-forward targets, the columns) of W and is exact. On a mixture-of-experts'
fused expert weights each expert has its own vector (`modules.experts`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..sites import Sites, linear_dims
from .base import CallContext, Handle, PeltModule, is_conv1d, map_input, map_output, site_key, site_name
from .config import ModuleConfig, targets
from .experts import ExpertScale, fused_weight, install_expert_update, merge_expert_update


@dataclass(frozen=True)
class IA3(ModuleConfig):
    """Config of (IA)³.

    targets: site roles or module-name suffixes; None = keys, values and the FFN's
    second projection (GPT-2: the fused c_attn and mlp.c_proj). feedforward: the
    targets whose *input* is scaled (default the "down" role).
    """

    kind: ClassVar[str] = "ia3"
    targets: tuple[str, ...] | None = None
    feedforward: tuple[str, ...] = ("down",)

    def validate(self) -> None:
        targets("IA3", self.targets)
        if not isinstance(self.feedforward, tuple) or not all(isinstance(t, str) for t in self.feedforward):
            raise ConfigError(f"IA3.feedforward must be a list of targets, got {self.feedforward!r}")

    def build(self, base: nn.Module, sites: Sites, **_: object) -> "IA3Module":
        resolved = sites.resolve(self.targets or sites.default_targets("ia3"), linear=True, what="IA3",
                                 experts=True)
        vectors: dict[str, tuple[bool, int]] = {}
        experts: dict[str, ExpertScale] = {}
        for target, names in resolved.items():
            on_input = target in self.feedforward
            for name in names:
                if name not in sites.names:  # a fused expert weight [E, out, in]
                    e, d_out, d_in = fused_weight(base, name).shape
                    experts[name] = ExpertScale(e, d_in if on_input else d_out, on_input)
                    continue
                d_in, d_out = linear_dims(sites.names[name])
                vectors[name] = (on_input, d_in if on_input else d_out)
        return IA3Module(self, vectors, experts)


class IA3Module(PeltModule):
    def __init__(self, config: IA3, vectors: dict[str, tuple[bool, int]],
                 experts: dict[str, ExpertScale] | None = None):
        super().__init__()
        self.config = config
        self.on_input = {site_key(n): inp for n, (inp, _) in vectors.items()}
        self.scales = nn.ParameterDict({site_key(n): nn.Parameter(torch.ones(size)) for n, (_, size) in vectors.items()})
        self.experts = nn.ModuleDict({site_key(n): update for n, update in (experts or {}).items()})

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        handles = []
        for key in self.scales:  # the vector is looked up per call: FSDP swaps the Parameter objects
            module, fn = base.get_submodule(site_name(key)), (lambda t, key=key: t * self.scales[key].to(t.dtype))
            handles.append(map_input(module, fn, ctx) if self.on_input[key] else map_output(module, fn, ctx))
        return handles + [install_expert_update(base, site_name(k), u, ctx) for k, u in self.experts.items()]

    @torch.no_grad()
    def merge_into(self, base: nn.Module) -> None:
        for key, scale in self.scales.items():
            module = base.get_submodule(site_name(key))
            w = module.weight                   # Linear: (out, in); Conv1D: (in, out)
            out_axis = 1 if is_conv1d(module) else 0
            if self.on_input[key]:
                w *= scale.unsqueeze(out_axis).to(w.dtype)
            else:
                w *= scale.unsqueeze(1 - out_axis).to(w.dtype)
                if module.bias is not None:
                    module.bias *= scale.to(module.bias.dtype)
        for key, update in self.experts.items():
            merge_expert_update(base, site_name(key), update)
