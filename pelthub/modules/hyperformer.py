"""Hyperformer++ (Karimi Mahabadi et al. 2021; as in VL-Adapter): bottleneck adapters generated per task and layer.

At adapter site m, for an example of task τ:

    I = LayerNorm(MLP([k_τ; z_m])) ∈ R^h
    [vec(W_down); b_down] = G_down I + c_down,   W_down ∈ R^{b×d}, b_down ∈ R^b
    [vec(W_up);   b_up]   = G_up I + c_up,       W_up ∈ R^{d×b},   b_up ∈ R^d
    adapter(x) = W_up act(W_down x + b_down) + b_up

k_τ ∈ R^e a task embedding, z_m ∈ R^e one embedding per adapter site (two per block under
"houlsby"). The MLP, LayerNorm and generators G, c are shared by every task and site. The
adapters sit where `Bottleneck` puts them (`placement`, the same hooks); G_up and c_up start at
zero, so a fresh module is the base model exactly. The base model stays frozen. A call generates
the adapters of the tasks present in its batch only, once each per site, and runs every example
through its own task's adapter in one batched matmul.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..sites import Sites
from .base import CallContext, Handle
from .bottleneck import ACTIVATIONS, PLACEMENTS, AdapterModule, adapter_sites
from .config import one_of, positive_int
from .hypernet import GeneratedConfig, TaskConditioned, mlp


@dataclass(frozen=True)
class Hyperformer(GeneratedConfig):
    """Config of Hyperformer++: one generated bottleneck adapter per (task, adapter site).

    tasks, embedding (e, also the site embeddings' size), hidden (h): see `GeneratedConfig`;
    placement: "houlsby" (after attention and FFN, as the paper), "pfeiffer" (after the FFN) or
    "parallel" (beside the FFN); reduction: hidden size / bottleneck b; activation: as `Bottleneck`'s.
    """

    kind: ClassVar[str] = "hyperformer"
    placement: str = "houlsby"
    reduction: int = 16
    activation: str = "relu"

    def validate(self) -> None:
        super().validate()
        one_of("Hyperformer", "placement", self.placement, PLACEMENTS)
        one_of("Hyperformer", "activation", self.activation, ACTIVATIONS)
        positive_int("Hyperformer", "reduction", self.reduction)

    def build(self, base: nn.Module, sites: Sites, **_: Any) -> "HyperformerModule":
        d = sites.geometry.hidden
        if d % self.reduction:
            raise ConfigError(f"Hyperformer.reduction={self.reduction} must divide the hidden size {d}")
        return HyperformerModule(self, adapter_sites(sites, self.placement, "Hyperformer"), d, d // self.reduction)


class HyperformerModule(TaskConditioned):
    """rows[τ]["embedding"]: k_τ (e,); the site embeddings, MLP, LayerNorm and generators are shared."""

    unmergeable = "each task's adapter is a nonlinear function added to a layer's output, not a weight update"

    def __init__(self, config: Hyperformer, pairs: list[tuple[str, str]], d: int, b: int):
        super().__init__(config, [{"embedding": torch.randn(config.embedding)} for _ in config.tasks])
        self.pairs, self.d, self.b = pairs, d, b
        self.site_embeddings = nn.Parameter(torch.randn(len(pairs), config.embedding))
        self.mlp = mlp(2 * config.embedding, config.hidden)
        self.norm = nn.LayerNorm(config.hidden)
        self.down = nn.Linear(config.hidden, b * d + b)   # W_down, b_down
        self.up = nn.Linear(config.hidden, d * b + d)     # W_up, b_up
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = ACTIVATIONS[config.activation]()

    def reads_call_state(self) -> bool:
        return True

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        """`Bottleneck`'s hooks at the same sites, each site's adapter generated per call (`adapter`)."""
        sites = {pair: Generated(partial(self.adapter, ctx, m)) for m, pair in enumerate(self.pairs)}
        return AdapterModule(self.config, sites).install(base, ctx)

    def generate(self, tasks: torch.Tensor, site: int) -> tuple[torch.Tensor, ...]:
        """Site `site`'s adapters for the given tasks: W_down (U, b, d), b_down (U, b), W_up (U, d, b), b_up (U, d)."""
        k = self.stacked("embedding", tasks)
        i = self.norm(self.mlp(torch.cat([k, self.site_embeddings[site].expand_as(k)], -1)))
        d, b = self.d, self.b
        w_down, b_down = self.down(i).split([b * d, b], -1)
        w_up, b_up = self.up(i).split([d * b, d], -1)
        return w_down.view(-1, b, d), b_down, w_up.view(-1, d, b), b_up

    def adapter(self, ctx: CallContext, site: int, x: torch.Tensor) -> torch.Tensor:
        """adapter(x) of every example (B, ..., d) under its task's generated adapter at `site`."""
        tasks, row = self.batch_tasks(ctx, x.shape[0])
        w_down, b_down, w_up, b_up = (t.index_select(0, row) for t in self.generate(tasks, site))
        h = x.reshape(x.shape[0], -1, self.d).to(w_down.dtype)
        h = self.act(torch.baddbmm(b_down[:, None], h, w_down.transpose(1, 2)))
        return torch.baddbmm(b_up[:, None], h, w_up.transpose(1, 2)).view(x.shape)


class Generated(nn.Module):
    """A parameterless stand-in for `AdapterLayer` whose forward is the given function (see `install`)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
