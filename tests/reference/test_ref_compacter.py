"""Compacter against an explicit torch.kron sum (ALGORITHMS.md §6, compacter.py).

    W = Σ_i A_i ⊗ (s_i t_iᵀ),  adapter(h) = up(act(down(h))),  PHM(x) = x·W + b

A_i are shared by every layer (one set for down, one for up); placement as for bottleneck adapters.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pelthub as ph
from tests import tiny
from tests.reference.handmade import Sequential, fill, logits, wrap

SITES = {"houlsby": [f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ("attention.output.dense",
                                                                               "output.dense")],
         "pfeiffer": [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]}


def kron_weight(a: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return sum(torch.kron(a[i], torch.outer(s[i], t[i])) for i in range(a.shape[0]))


def compacter_fn(state: dict[str, torch.Tensor], site: str, act):
    key = f"layers.{site.replace('.', '-')}"
    down = kron_weight(state["slow.down"], state[f"{key}.down.s"], state[f"{key}.down.t"])
    up = kron_weight(state["slow.up"], state[f"{key}.up.s"], state[f"{key}.up.t"])
    return lambda h: act(h @ down + state[f"{key}.down.bias"]) @ up + state[f"{key}.up.bias"]


@pytest.mark.parametrize("placement,activation,n,reduction", [("houlsby", "swish", 4, 4), ("pfeiffer", "relu", 2, 8)])
def test_compacter_equals_explicit_kron_sum(placement, activation, n, reduction):
    model = ph.attach(tiny.bert(), ph.Compacter(n=n, reduction=reduction, placement=placement, activation=activation))
    fill(model.adapters)
    state = model.adapters["default"]["compacter"].state_dict()
    assert state["slow.down"].shape == (n, n, n)
    assert {tuple(v.shape) for k, v in state.items() if k.endswith("down.t")} == {(n, 32 // reduction // n)}
    ref = tiny.bert()
    act = F.silu if activation == "swish" else torch.relu
    for site in SITES[placement]:
        wrap(ref, site, lambda m, s=site: Sequential(m, compacter_fn(state, s, act)))
    batch = tiny.batch("bert")
    torch.testing.assert_close(logits(model, **batch), logits(ref, **batch), atol=1e-5, rtol=1e-5)


def test_slow_weights_are_one_tensor_for_every_layer():
    model = ph.attach(tiny.bert(), ph.Compacter(n=2, reduction=4))
    module = model.adapters["default"]["compacter"]
    batch = tiny.batch("bert")
    fill(module)
    before = logits(model, **batch)
    with torch.no_grad():
        module.slow.down.mul_(2.0)       # one edit must reach every layer's down projection
    ref = tiny.bert()
    state = module.state_dict()
    for site in SITES["houlsby"]:
        wrap(ref, site, lambda m, s=site: Sequential(m, compacter_fn(state, s, F.silu)))
    after = logits(model, **batch)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, logits(ref, **batch), atol=1e-5, rtol=1e-5)
