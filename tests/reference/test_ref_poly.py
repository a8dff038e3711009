"""Poly / MHR against the explicit per-example mixture (ALGORITHMS.md §1, routing/poly.py).

For example b of task t, per head q: w = σ(Z[t]) viewed (h, K), normalised over k;
A_b[q] = Σ_k w[q,k] A[q,k], B_b[q] = Σ_k w[q,k] B[q,k]; Ā_b stacks heads along the input, B̄_b along the
output; ΔW_b = (α/r)·Ā_b·B̄_b (in × out). The reference runs the base on example b alone with W + ΔW_bᵀ.
"""
from __future__ import annotations

import pytest
import torch

import pelthub as ph
from pelthub.routing.poly import poly_module
from tests import tiny
from tests.reference.handmade import fill, logits, with_weights

Q = [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
V = [f"bert.encoder.layer.{i}.attention.self.value" for i in range(2)]


def routing_key(site: str, granularity: str) -> str:
    if granularity == "model":
        return "model"
    if granularity == "block":
        site = ".".join(site.split(".")[:4])           # bert.encoder.layer.N
    return site.replace(".", "-")


def mixture(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """ΔW (in, out) without the scale, for A (h, K, in/h, r), B (h, K, r, out/h) and weights w (h, K), with loops."""
    heads, skills = w.shape
    a_heads = [sum(w[q, k] * a[q, k] for k in range(skills)) for q in range(heads)]      # h × (in/h, r)
    b_heads = [sum(w[q, k] * b[q, k] for k in range(skills)) for q in range(heads)]      # h × (r, out/h)
    return torch.cat(a_heads, 0) @ torch.cat(b_heads, 1)


def eval_weights(z_row: torch.Tensor, heads: int, skills: int) -> torch.Tensor:
    s = torch.sigmoid(z_row.view(heads, skills))
    return s / s.sum(-1, keepdim=True)


def per_example_reference(model, sites, weights_of, scale: float, batch, build=tiny.bert) -> torch.Tensor:
    """Logits of each example from the base with its own ΔW_b; weights_of(site, b) gives w (h, K)."""
    state = poly_module(model).state_dict()
    fresh = build()
    params = dict(fresh.named_parameters())
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        edits = {}
        for site in sites:
            key = f"layers.{site.replace('.', '-')}"
            delta = scale * mixture(state[f"{key}.lora_a"], state[f"{key}.lora_b"], weights_of(site, i))
            edits[f"{site}.weight"] = params[f"{site}.weight"] + delta.T
        one = {k: v[i:i + 1] for k, v in batch.items()}
        rows.append(logits(with_weights(fresh, edits), **one))
    return torch.cat(rows)


@pytest.mark.parametrize("heads,granularity", [(1, "layer"), (4, "layer"), (2, "block"), (2, "model")])
def test_eval_output_is_the_explicit_per_example_mixture(heads, granularity):
    config = ph.Poly(tasks=["a", "b", "c"], skills=3, rank=2, heads=heads, granularity=granularity, alpha=2.0)
    model = ph.compose(tiny.bert(), config).eval()
    module = poly_module(model)
    fill(module, scale=0.5)
    state = module.state_dict()
    groups = {k.removeprefix("router.") for k in state if k.startswith("router.")}
    assert groups == {routing_key(s, granularity) for s in Q + V}
    assert all(v.shape == (3, heads * 3) for k, v in state.items() if k.startswith("router."))
    assert state[f"layers.{Q[0].replace('.', '-')}.lora_a"].shape == (heads, 3, 32 // heads, 2)
    tasks = [2, 0, 1]
    batch = tiny.batch("bert")
    weights_of = lambda site, i: eval_weights(state[f"router.{routing_key(site, granularity)}"][tasks[i]], heads, 3)
    expected = per_example_reference(model, Q + V, weights_of, 2.0 / 2, batch)
    torch.testing.assert_close(logits(model, **batch, task_ids=["c", "a", "b"]), expected, atol=1e-5, rtol=1e-5)


def test_one_skill_one_head_is_lora_with_scale_one_over_r_in_training_too():
    model = ph.compose(tiny.bert(), ph.Poly(tasks=["a", "b"], skills=1, rank=4, targets=["k"], alpha=1.0)).eval()
    module = poly_module(model)
    fill(module, scale=0.5)
    state = module.state_dict()
    fresh = tiny.bert()
    params = dict(fresh.named_parameters())
    edits = {}
    for site in (f"bert.encoder.layer.{i}.attention.self.key" for i in range(2)):
        key = f"layers.{site.replace('.', '-')}"
        a, b = state[f"{key}.lora_a"][0, 0], state[f"{key}.lora_b"][0, 0]      # (in, r), (r, out)
        edits[f"{site}.weight"] = params[f"{site}.weight"] + (a @ b).T / 4
    batch = tiny.batch("bert")
    expected = logits(with_weights(fresh, edits), **batch)
    torch.testing.assert_close(logits(model, **batch, task_ids=[0, 1, 0]), expected, atol=1e-5, rtol=1e-5)
    module.train()                                   # relaxed-Bernoulli sampling on; one skill still weighs 1
    torch.testing.assert_close(logits(model, **batch, task_ids=[0, 1, 0]), expected, atol=1e-5, rtol=1e-5)


def test_training_sampler_is_the_relaxed_bernoulli_with_unit_temperature():
    model = ph.compose(tiny.bert(), ph.Poly(tasks=["a", "b"], skills=3, rank=2, heads=2, targets=["q"]))
    module = poly_module(model)
    group = next(iter(module.router))
    with torch.no_grad():
        module.router[group].copy_(torch.tensor([[1.5, -0.5, 0.0, 2.0, -2.0, 0.3], [0.0] * 6]))
    n = 20000
    ids = torch.zeros(n, dtype=torch.long)
    torch.manual_seed(0)
    got = module.weights(group, ids, sample=True)                               # (n, h, K)
    logits_z = module.router[group][0].detach().view(2, 3).expand(n, -1, -1)
    torch.manual_seed(1)
    draws = torch.distributions.RelaxedBernoulli(torch.tensor(1.0), logits=logits_z).sample()
    expected = draws / draws.sum(-1, keepdim=True)
    qs = torch.linspace(0.05, 0.95, 19)
    for q in range(2):
        for k in range(3):
            torch.testing.assert_close(got[:, q, k].quantile(qs), expected[:, q, k].quantile(qs), atol=0.015, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(n, 2))
    corr = torch.corrcoef(torch.stack([got[:, 0, 0], got[:, 1, 0]]))[0, 1]
    assert corr.abs() < 0.03                                                     # independent noise per head
    got[:, 0, 0].sum().backward()                                                # reparameterised: Z gets a gradient
    assert module.router[group].grad[0].abs().sum() > 0


def test_mu_variant_is_the_uniform_mixture_and_hard_variant_the_task_skill():
    batch = tiny.batch("bert")
    for variant in ("mu", "hard"):
        model = ph.compose(tiny.bert(), ph.Poly(tasks=["a", "b", "c"], skills=3, rank=2, heads=2,
                                                variant=variant, alpha=1.0)).eval()
        module = poly_module(model)
        assert not any(k.startswith("router.") for k in module.state_dict())
        fill(module, scale=0.5)
        tasks = [1, 2, 0]
        uniform = torch.full((2, 3), 1 / 3)
        weights_of = (lambda site, i: uniform) if variant == "mu" else \
            (lambda site, i: torch.eye(3)[tasks[i]].expand(2, -1))
        expected = per_example_reference(model, Q + V, weights_of, 1.0 / 2, batch)
        torch.testing.assert_close(logits(model, **batch, task_ids=tasks), expected, atol=1e-5, rtol=1e-5)


def test_z_variant_trains_routing_only():
    module = poly_module(ph.compose(tiny.bert(), ph.Poly(tasks=2, skills=2, rank=2, variant="z")))
    assert module.config.tasks == ("0", "1")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("router.") for n in trainable)


def test_targets_rank_and_dropout_arguments():
    batch = tiny.batch("bert")
    sites = [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    model = ph.compose(tiny.bert(), ph.Poly(tasks=["a"], skills=2, rank=3, targets=["down"], alpha=1.0)).eval()
    module = poly_module(model)
    fill(module, scale=0.5)
    state = module.state_dict()
    assert {k.split(".")[1] for k in state if k.startswith("layers.")} == {s.replace(".", "-") for s in sites}
    assert state[f"layers.{sites[0].replace('.', '-')}.lora_b"].shape == (1, 2, 3, 32)
    weights_of = lambda site, i: eval_weights(state[f"router.{routing_key(site, 'layer')}"][0], 1, 2)
    expected = per_example_reference(model, sites, weights_of, 1.0 / 3, batch)
    torch.testing.assert_close(logits(model, **batch), expected, atol=1e-5, rtol=1e-5)
    for p, differs in ((0.0, False), (0.5, True)):   # variant "mu" samples no routing: dropout is the only noise
        model = ph.compose(tiny.bert(), ph.Poly(tasks=["a"], skills=2, rank=3, variant="mu", dropout=p, alpha=1.0)).eval()
        fill(poly_module(model), scale=0.5)
        evaluated = logits(model, **batch)
        poly_module(model).train()
        assert (not torch.allclose(logits(model, **batch), evaluated, atol=1e-4)) == differs, p
