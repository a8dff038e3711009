"""Transferability metrics against their formulas on hand-made tensors (ALGORITHMS.md §5, transfer/metrics.py),
and prompt activations against a hand-placed recorder of the FFN intermediate (transfer/activations.py)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pelthub.transfer import activation_cosine, cosine_avg, cosine_tokens, euclidean, on, prompt_activations, \
    score_matrix
from tests import tiny
from tests.reference.handmade import wrap


def cos(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.flatten().double(), y.flatten().double()
    return float((x @ y) / math.sqrt(float(x @ x) * float(y @ y)))


def test_on_counts_shared_active_neurons_over_a_layer_window():
    a = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.0, 3.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    b = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 2.0, 1.0, 0.0], [-1.0, -1.0, -1.0, 1.0]])
    # layers 0-1: active a = {0, 2, 5}, b = {0, 1, 5, 6}, shared {0, 5}
    assert on(a, b, layers=[0, 1]) == pytest.approx(2 / math.sqrt(3 * 4))
    assert on(a, b, layers=[1]) == pytest.approx(1 / math.sqrt(1 * 2))
    assert on(a, b, layers=slice(1, None)) == pytest.approx(2 / math.sqrt(5 * 3))       # {5, 8..11} vs {5, 6, 11}
    assert on(a, b) == pytest.approx(3 / math.sqrt(7 * 5))
    assert on(a, a) == pytest.approx(1.0) and on(torch.zeros(3, 4), a) == 0.0


def test_prompt_metrics_equal_their_formulas():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(4, 6, generator=g), torch.randn(3, 6, generator=g)
    assert cosine_avg(p, q) == pytest.approx(cos(p.mean(0), q.mean(0)), abs=1e-6)
    raw = sum(cos(p[i], q[j]) for i in range(4) for j in range(3)) / 12
    assert cosine_tokens(p, q, normalize=False) == pytest.approx(raw, abs=1e-6)
    unit = lambda x: (x / x.norm(dim=1, keepdim=True)).mean(0)                  # noqa: E731
    assert cosine_tokens(p, q, normalize=True) == pytest.approx(cos(unit(p), unit(q)), abs=1e-6)
    assert cosine_tokens(p, p, normalize=True) == pytest.approx(1.0, abs=1e-6) and cosine_tokens(p, p, normalize=False) < 0.9
    r = p + torch.randn(4, 6, generator=g)
    assert euclidean(p, r) == pytest.approx(1 / (1 + float((p - r).double().pow(2).sum().sqrt())), abs=1e-6)
    assert euclidean(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]])) == pytest.approx(1 / 6)


def test_activation_cosine_over_a_layer_window():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    assert activation_cosine(a, b) == pytest.approx(cos(a, b), abs=1e-6)
    assert activation_cosine(a, b, layers=[0, 2]) == pytest.approx(cos(a[[0, 2]], b[[0, 2]]), abs=1e-6)


@pytest.mark.parametrize("metric", ["cosine_avg", "cosine_tokens", "euclidean", "on", "activation_cosine"])
def test_score_matrix_is_every_pair(metric):
    g = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(3, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    one = {"cosine_avg": cosine_avg, "cosine_tokens": cosine_tokens, "euclidean": euclidean, "on": on,
           "activation_cosine": activation_cosine}[metric]
    expected = torch.tensor([[one(x, y) for y in ys] for x in xs])
    torch.testing.assert_close(score_matrix(metric, xs, ys), expected, atol=1e-6, rtol=1e-6)


class Recorder(nn.Module):
    def __init__(self, inner: nn.Module, store: list):
        super().__init__()
        self.inner, self.store = inner, store

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.store.append(out)
        return out


@pytest.mark.parametrize("arch,site", [("bert", "bert.encoder.layer.{}.intermediate"),
                                       ("gpt2", "transformer.h.{}.mlp.act")])
@pytest.mark.parametrize("position", ["filler", "mean"])
def test_prompt_activations_are_the_ffn_intermediate(arch, site, position):
    g = torch.Generator().manual_seed(3)
    prompts = torch.randn(2, 3, 32, generator=g) * 0.5
    got = prompt_activations(tiny.BUILDERS[arch](), prompts, filler_id=7, position=position)
    ref, store = tiny.BUILDERS[arch](), []
    for i in range(2):
        wrap(ref, site.format(i), lambda m: Recorder(m, store))
    rows = []
    for p in prompts:
        store.clear()
        x = torch.cat([p, ref.get_input_embeddings().weight[7][None]])[None]
        with torch.no_grad():
            ref(inputs_embeds=x, attention_mask=torch.ones(1, 4, dtype=torch.long))
        acts = torch.stack([s[0] for s in store])                        # (layers, 4, F)
        rows.append(acts[:, 3] if position == "filler" else acts[:, :3].mean(1))
    torch.testing.assert_close(got, torch.stack(rows), atol=1e-5, rtol=1e-5)
