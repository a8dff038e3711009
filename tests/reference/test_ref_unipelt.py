"""UniPELT against each part times its gate computed by hand (ALGORITHMS.md §2, routing/gates.py).

    g = Σ_t m_t σ(w·x_t + b) / Σ_t m_t      (masked mean over the real tokens of the part's input x)
    LoRA:    y = W₀x + g·B·A·x             (no α/r)
    adapter: h ← h + g·up(act(down(h)))
    prefix:  K_p, V_p ← g·K_p, g·V_p       (x: the hidden state entering self-attention)
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pelthub as ph
from tests import tiny
from tests.reference.handmade import fill, gpt2_by_hand, gpt2_one_layer, logits, wrap

ACTS = {"relu": torch.relu, "tanh": torch.tanh}


def unipelt_of(model):
    return model.adapters["default"]["unipelt"]


def gate_fn(state: dict[str, torch.Tensor], part: str, key: str, mask: torch.Tensor):
    w, b = state[f"gates.{part}.{key}.weight"], state[f"gates.{part}.{key}.bias"]

    def gate(x: torch.Tensor) -> torch.Tensor:                       # (B, n, d) → (B,)
        scores = torch.sigmoid(x @ w.T + b).squeeze(-1)
        m = mask[:, -x.shape[1]:].float()
        return (scores * m).sum(1) / m.sum(1)
    return gate


class GatedLoRA(nn.Module):
    def __init__(self, inner, a, b, gate):
        super().__init__()
        self.inner, self.a, self.b, self.gate = inner, a, b, gate

    def forward(self, x):
        return self.inner(x) + self.gate(x)[:, None, None] * (x @ self.a.T @ self.b.T)


class GatedAdapter(nn.Module):
    def __init__(self, inner, adapter, gate):
        super().__init__()
        self.inner, self.adapter, self.gate = inner, adapter, gate

    def forward(self, x):
        h = self.inner(x)
        return h + self.gate(h)[:, None, None] * self.adapter(h)


def bert_reference(state, mask, lora_sites, adapter_sites, act, scale=1.0):
    ref = tiny.bert()
    for site in lora_sites:
        key = site.replace(".", "-")
        a, b = state[f"parts.lora.{key}.lora_a"], state[f"parts.lora.{key}.lora_b"]
        wrap(ref, site, lambda m, a=a, b=b, k=key: GatedLoRA(m, a, b, gate_fn(state, "lora", k, mask)))
    for site in adapter_sites:
        key = site.replace(".", "-")
        wd, bd, wu, bu = (state[f"parts.adapter.{key}.{p}"] for p in ("down.weight", "down.bias", "up.weight",
                                                                     "up.bias"))
        adapter = lambda h, wd=wd, bd=bd, wu=wu, bu=bu: scale * (act(h @ wd.T + bd) @ wu.T + bu)
        wrap(ref, site, lambda m, ad=adapter, k=key: GatedAdapter(m, ad, gate_fn(state, "adapter", k, mask)))
    return ref


LAYERS = range(2)
QV = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in LAYERS for p in ("query", "value")]
K = [f"bert.encoder.layer.{i}.attention.self.key" for i in LAYERS]
FFN = [f"bert.encoder.layer.{i}.output.dense" for i in LAYERS]
HOULSBY = sorted(FFN + [f"bert.encoder.layer.{i}.attention.output.dense" for i in LAYERS])


@pytest.mark.parametrize("lora,adapter,lora_sites,adapter_sites,act,scale", [
    (ph.LoRA(r=2), ph.Bottleneck(reduction=4), QV, FFN, "relu", 1.0),
    (ph.LoRA(r=3, alpha=99.0, targets=["k"]), ph.Bottleneck(reduction=8, placement="houlsby", activation="tanh",
                                                            scale=2.0), K, HOULSBY, "tanh", 2.0),
    (ph.LoRA(r=2), None, QV, [], "relu", 1.0),
    (None, ph.Bottleneck(reduction=4), [], FFN, "relu", 1.0),
], ids=["lora+pfeiffer", "lora-k+houlsby-tanh", "lora-only", "adapter-only"])
def test_gated_lora_and_adapter_equal_the_hand_written_gates(lora, adapter, lora_sites, adapter_sites, act, scale):
    model = ph.attach(tiny.bert(), ph.UniPELT(lora=lora, adapter=adapter)).eval()
    fill(model.adapters)
    state = unipelt_of(model).state_dict()
    assert {k.split(".")[2] for k in state if k.startswith("parts.lora.")} == {s.replace(".", "-") for s in lora_sites}
    assert {k.split(".")[2] for k in state if k.startswith("parts.adapter.")} == \
        {s.replace(".", "-") for s in adapter_sites}
    batch = tiny.batch("bert")
    ref = bert_reference(state, batch["attention_mask"], lora_sites, adapter_sites, ACTS[act], scale)
    torch.testing.assert_close(logits(model, **batch), logits(ref, **batch), atol=1e-5, rtol=1e-5)


def test_forced_gates():
    """Gate 0 removes a part exactly; gate 1 is the part with scale one (LoRA without α/r)."""
    model = ph.attach(tiny.bert(), ph.UniPELT(lora=ph.LoRA(r=2), adapter=ph.Bottleneck(reduction=4))).eval()
    fill(model.adapters)
    module = unipelt_of(model)
    state = module.state_dict()
    batch = tiny.batch("bert")
    ones = lambda x: torch.ones(x.shape[0])                                  # noqa: E731
    module.force_gate("adapter", 0.0)
    module.force_gate("lora", 1.0)
    ref = tiny.bert()
    for site in QV:
        key = site.replace(".", "-")
        wrap(ref, site, lambda m, k=key: GatedLoRA(m, state[f"parts.lora.{k}.lora_a"], state[f"parts.lora.{k}.lora_b"],
                                                   ones))
    torch.testing.assert_close(logits(model, **batch), logits(ref, **batch), atol=1e-5, rtol=1e-5)
    module.force_gate("lora", 0.0)
    torch.testing.assert_close(logits(model, **batch), logits(tiny.bert(), **batch), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("hidden", [None, 8])
def test_gated_prefix_equals_attention_by_hand(hidden):
    """Fails on transformers 5.24 until the gate hook reads the cache there (issue 13, part 1)."""
    model = ph.attach(gpt2_one_layer(), ph.UniPELT(prefix=ph.Prefix(length=3, hidden=hidden))).eval()
    module = unipelt_of(model)
    fill(module, scale=0.5)
    state = module.state_dict()
    flat = module.parts["prefix"].flat().detach()
    kv = flat.view(3, 2, 4, 8)
    pairs = [(kv[:, 0].transpose(0, 1).expand(3, -1, -1, -1), kv[:, 1].transpose(0, 1).expand(3, -1, -1, -1))]
    batch = tiny.batch("gpt2")
    gate = gate_fn(state, "prefix", "transformer-h-0-attn", batch["attention_mask"])
    base = gpt2_one_layer()
    with torch.no_grad():
        expected = gpt2_by_hand(base, batch["input_ids"], batch["attention_mask"], prefix=pairs,
                                prefix_scale=lambda _layer, h: gate(h))
        ungated = gpt2_by_hand(base, batch["input_ids"], batch["attention_mask"], prefix=pairs)
        t = base.transformer                          # the input of layer 0's attention: positions after the prefix
        entering = t.h[0].ln_1(t.wte(batch["input_ids"]) + t.wpe(torch.arange(3, 3 + batch["input_ids"].shape[1])))
    assert not torch.allclose(expected, ungated, atol=1e-3)
    torch.testing.assert_close(logits(model, **batch), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.gate_values()["transformer.h.0.attn"]["prefix"], gate(entering),
                               atol=1e-6, rtol=1e-5)
