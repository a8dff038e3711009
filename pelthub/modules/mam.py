"""MAM adapter (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning").

A preset of two existing parts, which the paper found the best mix at its budget:

- prefix tuning at every attention layer (`Prefix`, L = 30, reparameterised by an MLP of 800);
- a scaled parallel adapter beside every FFN: ffn(x) + s · up(ReLU(down(x))), x the FFN input,
  s = 4, bottleneck 512 (He et al. on BART-large, d = 1024: half the hidden size). On a smaller
  model the bottleneck is capped at d/2, so the adapter stays a bottleneck.

The adapter's up-projection starts at zero, so only the prefix changes a fresh model. MAM computes
exactly what attaching `Prefix(length, hidden)` and `Bottleneck(placement="parallel", scale=s,
activation="relu")` of that bottleneck computes; it exists so the paper's recipe is one name.
It needs attention that takes a cache (the prefix): ViT and CLIP vision refuse it. Per-task batches
run those two parts under `PerTask(Prefix(...), Bottleneck(placement="parallel", ...))`; PerTask
does not take MAM itself, and MAM does not merge into the base (the prefix is no weight update).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..sites import Sites
from .base import CallContext, Handle, PeltModule
from .bottleneck import AdapterLayer, AdapterModule, adapter_sites
from .config import ModuleConfig, positive_int, positive_number
from .prefix import Prefix, PrefixModule


@dataclass(frozen=True)
class MAM(ModuleConfig):
    """Config of the MAM adapter: prefix (length, hidden) + parallel adapter (bottleneck, scale).

    bottleneck: the adapter's width, capped at half the model's hidden size.
    prefix_hidden: width of the prefix's reparameterisation MLP, or None for a direct prefix.
    """

    kind: ClassVar[str] = "mam"
    placement: ClassVar[str] = "parallel"  # what AdapterModule reads off its config
    prefix_length: int = 30
    prefix_hidden: int | None = 800
    bottleneck: int = 512
    scale: float = 4.0

    def validate(self) -> None:
        positive_int("MAM", "prefix_length", self.prefix_length)
        if self.prefix_hidden is not None:
            positive_int("MAM", "prefix_hidden", self.prefix_hidden)
        positive_int("MAM", "bottleneck", self.bottleneck)
        positive_number("MAM", "scale", self.scale)

    def prefix_config(self) -> Prefix:
        return Prefix(length=self.prefix_length, hidden=self.prefix_hidden)

    def width(self, hidden: int) -> int:
        """The adapter's bottleneck on a model of this hidden size."""
        return max(1, min(self.bottleneck, hidden // 2))

    def build(self, base: nn.Module, sites: Sites, **kwargs: object) -> "MAMModule":
        prefix = self.prefix_config().build(base, sites, **kwargs)
        d = sites.geometry.hidden
        adapter = AdapterModule(self, {pair: AdapterLayer(d, self.width(d), "relu", self.scale)
                                       for pair in adapter_sites(sites, "parallel", "MAM")})
        return MAMModule(self, prefix, adapter)


class MAMModule(PeltModule):
    """The prefix (`prefix`) and the parallel adapters (`adapter`), each the built form of its own kind."""

    def __init__(self, config: MAM, prefix: PrefixModule, adapter: AdapterModule):
        super().__init__()
        self.config = config
        self.prefix_part, self.adapter = prefix, adapter

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        return self.adapter.install(base, ctx)

    def prefix(self, batch: int, ctx: CallContext) -> list:
        return self.prefix_part.prefix(batch, ctx)
