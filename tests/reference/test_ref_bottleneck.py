"""Bottleneck adapters against their placement formulas written by hand (ALGORITHMS.md §6, bottleneck.py).

    sequential (pfeiffer after the FFN; houlsby also after attention): h ← h + s·up(act(down(h)))
    parallel: ffn(x) ← ffn(x) + s·up(act(down(x))), x the FFN input

The reference is a fresh base whose modules are wrapped by the small nn.Modules below.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pelthub as ph
from tests import tiny
from tests.reference.handmade import Sequential, fill, logits, wrap

ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu, "swish": F.silu, "tanh": torch.tanh, "gelu": F.gelu}


def adapter_fn(state: dict[str, torch.Tensor], site: str, act, scale: float):
    """h ↦ s·(act(h·W_dᵀ + b_d)·W_uᵀ + b_u) from the weights pelthub stored for `site`."""
    key = f"layers.{site.replace('.', '-')}"
    wd, bd, wu, bu = (state[f"{key}.{p}"] for p in ("down.weight", "down.bias", "up.weight", "up.bias"))
    return lambda h: scale * (act(h @ wd.T + bd) @ wu.T + bu)


class Parallel(nn.Module):
    """inner(x) + adapter(x): the FFN module is one module (GPT-2's mlp)."""

    def __init__(self, inner: nn.Module, adapter):
        super().__init__()
        self.inner, self.adapter = inner, adapter

    def forward(self, x):
        return self.inner(x) + self.adapter(x)


class Remember(nn.Module):
    """Passes through, keeping its input for a later module of the same layer (BERT's FFN input)."""

    def __init__(self, inner: nn.Module, store: list):
        super().__init__()
        self.inner, self.store = inner, store

    def forward(self, x):
        self.store[:] = [x]
        return self.inner(x)


class AddOf(nn.Module):
    """inner(y) + adapter(x) with x what `Remember` kept."""

    def __init__(self, inner: nn.Module, adapter, store: list):
        super().__init__()
        self.inner, self.adapter, self.store = inner, adapter, store

    def forward(self, y):
        return self.inner(y) + self.adapter(self.store[0])


SITES = {  # (arch, placement) -> sites whose output gets a sequential adapter, or parallel (in, out) sites
    ("bert", "pfeiffer"): [f"bert.encoder.layer.{i}.output.dense" for i in range(2)],
    ("bert", "houlsby"): [f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.output.dense",
                                                                                    "output.dense")],
    ("gpt2", "pfeiffer"): [f"transformer.h.{i}.mlp" for i in range(2)],
    ("gpt2", "houlsby"): [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_proj", "mlp")],
}


def reference(arch: str, placement: str, state: dict[str, torch.Tensor], act, scale: float) -> nn.Module:
    ref = tiny.BUILDERS[arch]()
    if placement != "parallel":
        for site in SITES[arch, placement]:
            wrap(ref, site, lambda m, s=site: Sequential(m, adapter_fn(state, s, act, scale)))
    elif arch == "gpt2":
        for i in range(2):
            site = f"transformer.h.{i}.mlp"
            wrap(ref, site, lambda m, s=site: Parallel(m, adapter_fn(state, s, act, scale)))
    else:
        for i in range(2):
            store: list = []
            out = f"bert.encoder.layer.{i}.output.dense"
            wrap(ref, f"bert.encoder.layer.{i}.intermediate", lambda m, st=store: Remember(m, st))
            wrap(ref, out, lambda m, s=out, st=store: AddOf(m, adapter_fn(state, s, act, scale), st))
    return ref


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("placement,activation,scale", [("pfeiffer", "relu", 1.0), ("houlsby", "swish", 1.0),
                                                         ("parallel", "relu", 4.0), ("pfeiffer", "tanh", 2.5)])
def test_adapter_equals_hand_written_placement(arch, placement, activation, scale):
    model = ph.attach(tiny.BUILDERS[arch](), ph.Bottleneck(placement=placement, reduction=4,
                                                            activation=activation, scale=scale))
    fill(model.adapters)
    module = model.adapters["default"]["bottleneck"]
    state = module.state_dict()
    assert all(v.shape[0] == 8 for k, v in state.items() if k.endswith("down.weight"))   # 32 / reduction 4
    batch = tiny.batch(arch)
    ref = reference(arch, placement, state, ACTS[activation], scale)
    torch.testing.assert_close(logits(model, **batch), logits(ref, **batch), atol=1e-5, rtol=1e-5)


def test_reduction_argument_sets_the_bottleneck_width():
    for reduction, width in ((2, 16), (8, 4)):
        module = ph.attach(tiny.bert(), ph.Bottleneck(reduction=reduction)).adapters["default"]["bottleneck"]
        assert {tuple(v.shape) for k, v in module.state_dict().items() if k.endswith("down.weight")} == {(width, 32)}


def test_fresh_adapter_is_the_identity_and_init_matches_the_paper():
    base_out = logits(tiny.bert(), **tiny.batch("bert"))
    model = ph.attach(tiny.bert(), ph.Bottleneck(reduction=4))
    torch.testing.assert_close(logits(model, **tiny.batch("bert")), base_out)
    state = model.adapters["default"]["bottleneck"].state_dict()
    downs = torch.cat([v.flatten() for k, v in state.items() if k.endswith("down.weight")])
    assert 0.01 < downs.std() < 0.03                       # N(0, 0.02)
    assert all(v.abs().sum() == 0 for k, v in state.items() if k.endswith(("up.weight", "up.bias", "down.bias")))
