"""LST (Sung et al. 2022, "Ladder Side-Tuning"): a small side network beside a frozen encoder.

The backbone runs under `torch.no_grad`, so it keeps no activations for backward and its
parameters get no gradient. A side network of width d' = d/r (the backbone's heads, each of
head_dim/r; FFN d_ff/r) reads the backbone's hidden states through a ladder of gated
down-projections, and the frozen head reads its output instead of the backbone's:

    g₀ = W_first·x_emb                          x_emb: the first layer's input (d → d')
    for each laddered layer i (in order):
        g ← μ_i·g + (1 − μ_i)·W_down,i·h_i      h_i: backbone layer i's output, no gradient
        g ← SideBlock_i(g)                       μ_i = σ(α_i / T), α_i = 0 at init, T = 0.1
    last hidden state ← W_up·LN(g)              (d' → d), what the pooler / head reads

A SideBlock is a post-LN encoder layer: g ← LN₁(g + W_o·Attn(W_q g, W_k g, W_v g)), then
g ← LN₂(g + W_down·act(W_up g)), no dropout. It starts as a structurally pruned copy of backbone
layer i: the paper ranks dimensions by Fisher information; pelthub ranks them by weight magnitude
(the documented simplification): the d' hidden dimensions with the largest Σ|w| over every weight
that reads or writes them in the laddered layers (one set S for the whole side network, kept in
order), per head the head_dim/r query-key dimensions with the largest |W_q row| + |W_k row| and
value-output dimensions with the largest |W_v row| + |W_o column|, and the d_ff/r FFN units with
the largest |W_up row| + |W_down column|. W_first and W_down,i start as the selection of S
(x ↦ x[S]), W_up as its transpose (zeros outside S), LN as the identity affine map.

Families: post-LN encoders whose layers are attention (q, k, v, o) → LayerNorm → FFN (up, down)
→ LayerNorm: BERT (MiniLM), RoBERTa, XLM-RoBERTa, ELECTRA and DistilBERT; others are refused.
The side output replaces the encoder's `last_hidden_state` (its `hidden_states` stay the
backbone's). Modules of other kinds inside the backbone run under no_grad too, so they get no
gradient: attach LST alone. The side network is no weight update: it does not merge into the base,
PEFT has no format for it, and it is not served per example (`adapter_names`, `PerTask`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..sites import Sites
from .base import CallContext, Handle, PeltModule
from .config import MAX_LAYERS, ModuleConfig, positive_int, positive_number

ENCODERS = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")
_LINEARS = ("q", "k", "v", "o", "up", "down")


@dataclass(frozen=True)
class LST(ModuleConfig):
    """Config of ladder side tuning. reduction: r, the side network is d/r wide. layers: the backbone
    layers laddered into it (indices, ascending; None: all), one side block each. temperature: T of the
    gates μ_i = σ(α_i / T)."""

    kind: ClassVar[str] = "lst"
    reduction: int = 8
    layers: tuple[int, ...] | None = None
    temperature: float = 0.1

    def validate(self) -> None:
        positive_int("LST", "reduction", self.reduction)
        positive_number("LST", "temperature", self.temperature, math.inf)
        if self.layers is not None and not (
                self.layers and all(type(i) is int and 0 <= i < MAX_LAYERS for i in self.layers)
                and list(self.layers) == sorted(set(self.layers))):
            raise ConfigError(f"LST.layers must be None (every layer) or distinct ascending layer indices from 0, "
                              f"e.g. [1, 2, 3, 5], got {self.layers!r:.80}")

    def build(self, base: nn.Module, sites: Sites, init: bool = True, **_: object) -> "LSTModule":
        g = sites.geometry
        if g.model_type not in ENCODERS or g.decoder_only or g.encoder_decoder or len(sites.stacks) != 1:
            raise UnsupportedModelError(f"LST builds its side network from post-LN encoder layers "
                                        f"({', '.join(ENCODERS)}); {type(base).__name__} "
                                        f"(model_type={g.model_type!r}) is not one of them")
        stack = sites.stacks[0]
        chosen = list(self.layers or range(len(stack)))
        if chosen[-1] >= len(stack):
            raise ConfigError(f"LST.layers={list(chosen)} names layers beyond the {len(stack)} of "
                              f"{type(base).__name__}; use indices 0 to {len(stack) - 1}")
        r = self.reduction
        if g.head_dim % r:
            divisors = [k for k in range(1, g.head_dim + 1) if g.head_dim % k == 0]
            raise ConfigError(f"LST.reduction={r} must divide the head size {g.head_dim} (the side network keeps "
                              f"all {g.heads} heads, each head_dim/r wide); choose one of {divisors}")
        parts = [_layer_parts(sites, stack[i]) for i in chosen]
        side = g.hidden // r
        blocks = [SideBlock(side, g.heads, max(1, p["up"].out_features // r), p) for p in parts]
        module = LSTModule(self, g.hidden, blocks, encoder=stack[0].rsplit(".", 2)[0], first=stack[0],
                           ladder=[stack[i] for i in chosen])
        if init:
            kept = _top(sum(_hidden_importance(p) for p in parts), side)
            for block, p in zip(blocks, parts):
                block.copy_pruned(p, kept)
            module.select(kept)
        return module


def _layer_parts(sites: Sites, layer: str) -> dict[str, Any]:
    """The linears (by role), the two LayerNorms (in order) and the activation of one post-LN encoder layer."""
    inside = {role: [n for n in sites.by_role.get(role, []) if n.startswith(layer + ".")] for role in _LINEARS}
    modules = [m for n, m in sites.names.items() if n.startswith(layer + ".")]
    norms = [m for m in modules if isinstance(m, nn.LayerNorm)]
    acts = [m for m in modules if not list(m.children()) and not list(m.parameters(recurse=False))
            and not isinstance(m, nn.Dropout)]
    if any(len(found) != 1 for found in inside.values()) or len(norms) != 2 or len(acts) != 1:
        raise UnsupportedModelError(f"LST copies post-LN encoder layers (one q, k, v, o, up, down, two LayerNorms, "
                                    f"one activation); {layer} has {({r: len(f) for r, f in inside.items()})}, "
                                    f"{len(norms)} LayerNorms and {len(acts)} activations")
    return {**{role: sites.names[found[0]] for role, found in inside.items()}, "norms": norms, "act": acts[0]}


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last dimension, ascending (order kept)."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def _hidden_importance(p: dict[str, Any]) -> torch.Tensor:
    """Σ|w| per hidden dimension over every weight of one layer that reads it (columns) or writes it (rows)."""
    reads = sum(p[r].weight.detach().abs().sum(0) for r in ("q", "k", "v", "up"))
    writes = sum(p[r].weight.detach().abs().sum(1) for r in ("o", "down"))
    return (reads + writes).float().cpu()


def _head_dims(score: torch.Tensor, heads: int, keep: int) -> torch.Tensor:
    """Per head, its `keep` highest-scoring dimensions, as indices into the heads·head_dim rows."""
    per_head = score.view(heads, -1)
    offsets = torch.arange(heads).unsqueeze(1) * per_head.shape[1]
    return (_top(per_head, keep) + offsets).flatten()


class SideBlock(nn.Module):
    """A post-LN encoder layer of width d' (see the module docstring), built to the shape of `parts`."""

    def __init__(self, width: int, heads: int, ffn: int, parts: dict[str, Any]):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, ffn), nn.Linear(ffn, width)
        self.norm1, self.norm2 = (nn.LayerNorm(width, eps=n.eps) for n in parts["norms"])
        self.act = copy.deepcopy(parts["act"])

    @torch.no_grad()
    def copy_pruned(self, p: dict[str, Any], kept: torch.Tensor) -> None:
        """Fill with backbone layer `p` restricted to hidden dims `kept` and its most important head dims and units
        (chosen on the CPU, wherever the backbone is)."""
        heads, keep = self.heads, self.q.out_features // self.heads
        w = {role: p[role].weight.detach().float().cpu() for role in _LINEARS}
        qk = _head_dims(w["q"].abs().sum(1) + w["k"].abs().sum(1), heads, keep)
        vo = _head_dims(w["v"].abs().sum(1) + w["o"].abs().sum(0), heads, keep)
        units = _top(w["up"].abs().sum(1) + w["down"].abs().sum(0), self.up.out_features)
        for role, rows, cols in (("q", qk, kept), ("k", qk, kept), ("v", vo, kept), ("o", kept, vo),
                                 ("up", units, kept), ("down", kept, units)):
            target = getattr(self, role)
            target.weight.copy_(w[role][rows][:, cols])
            target.bias.copy_(p[role].bias.detach().cpu()[rows])
        for norm, source in zip((self.norm1, self.norm2), p["norms"]):
            norm.weight.copy_(source.weight.detach().cpu()[kept])
            norm.bias.copy_(source.bias.detach().cpu()[kept])

    def forward(self, g: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """g (B, n, d'); mask (B, 1, 1, n) True where a key is a real token, or None."""
        b, n, _ = g.shape
        q, k, v = (x(g).view(b, n, self.heads, -1).transpose(1, 2) for x in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, -1)
        g = self.norm1(g + self.o(attended))
        return self.norm2(g + self.down(self.act(self.up(g))))


class LSTModule(PeltModule):
    """The side network (`first`, `downs`, `gates` α, `blocks`, `norm`, `up`) and the hooks that feed and read it.

    Hooks: the encoder (`encoder`) runs with gradients off; the first layer's input is x_emb; each
    laddered layer's output is kept for the call; the encoder's output is replaced by the side output.
    """

    def __init__(self, config: LST, hidden: int, blocks: list[SideBlock], encoder: str, first: str,
                 ladder: list[str]):
        super().__init__()
        self.config = config
        side = blocks[0].q.in_features
        self.first = nn.Linear(hidden, side)
        self.downs = nn.ModuleList(nn.Linear(hidden, side) for _ in blocks)
        self.gates = nn.Parameter(torch.zeros(len(blocks)))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(side)
        self.up = nn.Linear(side, hidden)
        self.encoder, self.first_layer, self.ladder = encoder, first, ladder

    @torch.no_grad()
    def select(self, kept: torch.Tensor) -> None:
        """W_first = W_down,i = x ↦ x[kept]; W_up its transpose; zero biases."""
        pick = torch.eye(self.up.out_features)[kept]
        for linear in (self.first, *self.downs):
            linear.weight.copy_(pick)
            linear.bias.zero_()
        self.up.weight.copy_(pick.T)
        self.up.bias.zero_()

    def mu(self) -> torch.Tensor:
        """The gates μ_i = σ(α_i / T), one per laddered layer."""
        return torch.sigmoid(self.gates / self.config.temperature)

    def side(self, x: torch.Tensor, hidden: list[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        """W_up·LN(g) from x_emb and the laddered layers' outputs (module docstring); mask (B, n) of real tokens."""
        dtype = self.first.weight.dtype
        keys = None if mask is None else mask.bool()[:, None, None, :]
        g = self.first(x.to(dtype))
        for block, down, mu, h in zip(self.blocks, self.downs, self.mu(), hidden):
            g = block(mu * g + (1 - mu) * down(h.to(dtype)), keys)
        return self.up(self.norm(g)).to(x.dtype)

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        def no_grad(_m: nn.Module, _args: tuple) -> None:
            if ctx.current() is None:
                raise ConfigError("LST replaces the encoder's output per call: call the ModularModel, not its base")
            if not ctx.bare:
                ctx.scratch(self)["grad"] = torch.is_grad_enabled()
                torch.set_grad_enabled(False)

        def embeds(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            ctx.scratch(self)["x"] = args[0] if args else kwargs["hidden_states"]

        def keep(i: int) -> Any:
            def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
                ctx.scratch(self).setdefault("h", {})[i] = out[0] if isinstance(out, tuple) else out
            return hook

        def replace(_m: nn.Module, _args: tuple, out: Any) -> Any:
            scratch = ctx.scratch(self)
            if "grad" not in scratch:  # the bare base (`disable_adapter`)
                return None
            torch.set_grad_enabled(scratch.pop("grad"))
            if out is None:   # the encoder raised (the hook always runs, to restore grad mode)
                return None
            h = scratch.pop("h")
            side = self.side(scratch.pop("x"), [h[i] for i in range(len(self.ladder))], ctx.attention_mask)
            if isinstance(out, tuple):
                return (side, *out[1:])
            out.last_hidden_state = side
            return out

        encoder = base.get_submodule(self.encoder)
        return [encoder.register_forward_pre_hook(no_grad),
                base.get_submodule(self.first_layer).register_forward_pre_hook(embeds, with_kwargs=True),
                *(base.get_submodule(name).register_forward_hook(keep(i)) for i, name in enumerate(self.ladder)),
                encoder.register_forward_hook(replace, always_call=True)]
