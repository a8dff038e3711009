"""Reference computations written out by hand, shared by the reference tests.

Nothing here calls pelthub: these are the formulas of ALGORITHMS.md applied to
a plain transformers model (or its weights), so a test comparing pelthub with
them compares against an independent implementation.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from tests import tiny


def gpt2_one_layer(seed: int = 0) -> GPT2LMHeadModel:
    """A 1-layer GPT-2 small enough to run by hand (4 heads of 8)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=tiny.VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def gpt2_by_hand(base: GPT2LMHeadModel, ids: torch.Tensor, mask: torch.Tensor,
                 prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 prefix_scale: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """GPT-2 logits computed from its weights: softmax(QKᵀ/√d_h)V with prefix keys/values before the real ones.

    prefix: per layer (K_p, V_p) of shape (B, H, L, d_h). The input positions then start at L (the
    cache length), and every query may attend to every prefix column. prefix_scale(layer, h) returns
    a (B,) factor for that layer's K_p and V_p from the hidden state h entering self-attention.
    """
    t, cfg = base.transformer, base.config
    b, n = ids.shape
    heads, hd = cfg.n_head, cfg.n_embd // cfg.n_head
    length = prefix[0][0].shape[2] if prefix else 0
    x = t.wte.weight[ids] + t.wpe.weight[torch.arange(length, length + n)]
    keys_ok = torch.cat([torch.ones(b, length, dtype=torch.bool), mask.bool()], 1)         # (B, L+n)
    causal = torch.arange(length + n)[None, :] <= (length + torch.arange(n))[:, None]      # (n, L+n)
    allowed = keys_ok[:, None, None, :] & causal[None, None]
    for i, block in enumerate(t.h):
        h = F.layer_norm(x, (cfg.n_embd,), block.ln_1.weight, block.ln_1.bias, cfg.layer_norm_epsilon)
        q, k, v = (h @ block.attn.c_attn.weight + block.attn.c_attn.bias).split(cfg.n_embd, -1)
        q, k, v = (z.view(b, n, heads, hd).transpose(1, 2) for z in (q, k, v))
        if prefix:
            pk, pv = prefix[i]
            if prefix_scale is not None:
                s = prefix_scale(i, h).view(b, 1, 1, 1)
                pk, pv = pk * s, pv * s
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~allowed, float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, cfg.n_embd)
        x = x + att @ block.attn.c_proj.weight + block.attn.c_proj.bias
        h = F.layer_norm(x, (cfg.n_embd,), block.ln_2.weight, block.ln_2.bias, cfg.layer_norm_epsilon)
        m = F.gelu(h @ block.mlp.c_fc.weight + block.mlp.c_fc.bias, approximate="tanh")
        x = x + m @ block.mlp.c_proj.weight + block.mlp.c_proj.bias
    x = F.layer_norm(x, (cfg.n_embd,), t.ln_f.weight, t.ln_f.bias, cfg.layer_norm_epsilon)
    return x @ base.lm_head.weight.T


def with_weights(base: nn.Module, edits: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of `base` whose parameters named in `edits` hold the given tensors."""
    ref = copy.deepcopy(base)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, value in edits.items():
            params[name].copy_(value)
    return ref


def wrap(model: nn.Module, name: str, make: Callable[[nn.Module], nn.Module]) -> None:
    """Replace submodule `name` by make(original)."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    setattr(owner, child, make(getattr(owner, child)))


def logits(model: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def fill(module: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Give every parameter of `module` random values (no zero up-projections left)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


class Sequential(nn.Module):
    """inner(x) followed by h + adapter(h)."""

    def __init__(self, inner: nn.Module, adapter):
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, *args, **kwargs):
        h = self.inner(*args, **kwargs)
        return h + self.adapter(h)


def biased(arch: str, seed: int = 0) -> nn.Module:
    """tiny.BUILDERS[arch]() with random biases (transformers initialises them to zero, hiding bias handling)."""
    model = tiny.BUILDERS[arch]()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


class WordTokenizer:
    """Maps each word to one id in [5, 85): enough for Prompt(init='text')."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [5 + (sum(map(ord, w)) % 80) for w in text.split()]}
