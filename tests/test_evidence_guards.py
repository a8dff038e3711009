"""Behavioural guards: the defaults let each method do what its paper says it does.

Each test trains or runs a tiny model for a second or two and checks an effect, not an
identity: a prefix fits a separable task, Poly / MHR routing specialises when two tasks
need different skills, ATTEMPT's attention depends on the input, a related source
outranks an unrelated one, and the metrics and samplers are the papers'.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pelthub as ph
from pelthub.routing import poly_module
from pelthub.tasks import Example
from pelthub.training import param_groups
from pelthub.transfer import cosine_tokens, score_matrix
from tests import tiny

D = 32  # width of the tiny models


def bag_batch(g: torch.Generator, b: int = 32, n: int = 8) -> dict[str, torch.Tensor]:
    """Label 0: every token from ids 10-49; label 1: from 50-89 (separable by the tokens present)."""
    y = torch.randint(0, 2, (b,), generator=g)
    ids = torch.randint(10, 50, (b, n), generator=g) + 40 * y[:, None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": y}


def two_task_batch(g: torch.Generator, b: int = 32) -> dict[str, torch.Tensor]:
    """Task 0 is the bag task, task 1 the same inputs with the opposite label: no shared update solves both."""
    batch = bag_batch(g, b)
    t = torch.randint(0, 2, (b,), generator=g)
    batch["labels"] = batch["labels"] ^ t
    batch["task_ids"] = t
    return batch


def train(model, make, steps: int, lr: float) -> None:
    """AdamW over `param_groups` (each module's default lr groups), fresh batches every step."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(param_groups(model, lr))
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        loss = model(**make(g)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model, task: int | None = None, n: int = 256) -> float:
    batch = bag_batch(torch.Generator().manual_seed(99), n)
    labels = batch.pop("labels")
    if task is not None:
        labels, batch["task_ids"] = labels ^ task, torch.full((n,), task)
    return (model(**batch).logits.argmax(-1) == labels).float().mean().item()


# ------------------------------------------------------------------ prefix
def test_a_prefix_alone_fits_a_separable_task_at_a_module_learning_rate():
    """The MLP prefix (Li & Liang's default) at lr 5e-2 with its default lr group: fits, not one class."""
    model = ph.attach(tiny.bert(), ph.Prefix(length=4), head=True)
    assert accuracy(model) < 0.7
    train(model, bag_batch, 200, 5e-2)
    assert accuracy(model) >= 0.85


def test_param_groups_give_each_module_its_default_learning_rate():
    prefix = ph.attach(tiny.bert(), ph.Prefix(length=4), head=True)
    groups = {g["name"]: g for g in param_groups(prefix, 1e-2, weight_decay=0.1)}
    module = prefix.adapters["default"]["prefix"]
    assert {id(p) for p in groups["prefix_mlp"]["params"]} == {id(p) for p in [module.embedding,
                                                                              *module.mlp.parameters()]}
    assert groups["prefix_mlp"]["lr"] == pytest.approx(1e-3) and groups["modules"]["lr"] == 1e-2
    assert "prefix_mlp" not in {g["name"] for g in param_groups(
        ph.attach(tiny.bert(), ph.Prefix(length=4, hidden=None)), 1e-2)}       # a direct prefix: one group
    poly = ph.compose(tiny.bert(), ph.Poly(tasks=("a", "b")))
    groups = {g["name"]: g for g in param_groups(poly, 1e-3, weight_decay=0.1)}
    assert {id(p) for p in groups["routing"]["params"]} == {id(p) for p in poly_module(poly).router.values()}
    assert groups["routing"]["lr"] == pytest.approx(5e-2) and groups["routing"]["weight_decay"] == 0.0
    assert 20 <= groups["routing"]["lr"] / groups["modules"]["lr"] <= 100                # the papers' range
    assert param_groups(poly, 1e-3, lr_routing=0.3)[-1]["lr"] == 0.3
    attempt = ph.compose(tiny.bert(), ph.AttentionMix({"s": torch.zeros(4, D)}, target=ph.Prompt(length=4)))
    routing = [g for g in param_groups(attempt, 0.03) if g["name"] == "routing"]
    assert [g["lr"] for g in routing] == [0.03]  # ATTEMPT's attention network trains at the prompt lr


# ------------------------------------------------------------------ Poly / MHR
def test_poly_and_lora_share_one_alpha_over_r_convention():
    """Default Poly(rank=r) with one skill is default LoRA(r=r): the same update size at the same lr."""
    inputs = tiny.batch("bert")
    poly = ph.compose(tiny.bert(), ph.Poly(tasks=("a",), skills=1, rank=4))
    lora = ph.attach(tiny.bert(), ph.LoRA(r=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, layer in poly_module(poly).layers.items():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.1)
            target = lora.adapters["default"]["lora"].layers[key]
            target.lora_a.copy_(layer.lora_a[0, 0].T)
            target.lora_b.copy_(layer.lora_b[0, 0].T)
        torch.testing.assert_close(poly(**inputs).logits, lora(**inputs).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 4])
def test_routing_specialises_when_two_tasks_need_different_skills(heads):
    """Opposite labels on the same inputs: a shared update is at chance on one of the two tasks.

    With the default routing lr each task's own routing row beats uniform routing on both
    tasks, the rows move apart, and swapping them inverts the predictions.
    """
    model = ph.compose(tiny.bert(), ph.Poly(tasks=("a", "b"), skills=2, rank=4, heads=heads), head=True)
    train(model, two_task_batch, 120, 1e-2)
    module = poly_module(model)
    spread = [float((w[0] - w[1]).abs().mean()) for w in module.routing_weights().values()]
    own = [accuracy(model, t) for t in (0, 1)]
    saved = {k: z.detach().clone() for k, z in module.router.items()}
    with torch.no_grad():
        for z in module.router.values():
            z.zero_()                                   # σ(0) for every skill: the uniform mixture
        uniform = [accuracy(model, t) for t in (0, 1)]
        for k, z in module.router.items():
            z.copy_(saved[k].flip(0))                   # task a gets b's row and b gets a's
        swapped = [accuracy(model, t) for t in (0, 1)]
    assert min(spread) > 0.2                            # at init the rows differ by < 1e-3
    assert min(own) >= 0.9 and min(o - u for o, u in zip(own, uniform)) > 0.2
    assert max(swapped) < 0.5


def test_relaxed_bernoulli_sampler_matches_torch_distribution():
    """Training weights follow σ(ℓ + Logistic noise) normalised over skills: the law of RelaxedBernoulli(τ=1)."""
    model = ph.compose(tiny.bert(), ph.Poly(tasks=("a",), skills=3, rank=2, granularity="model"))
    module = poly_module(model)
    logits = torch.tensor([2.0, 0.0, -1.5])
    with torch.no_grad():
        module.router["model"].copy_(logits[None])
    torch.manual_seed(0)
    ours = module.weights("model", torch.zeros(20000, dtype=torch.long), sample=True)[:, 0]      # (n, K)
    ref = torch.distributions.RelaxedBernoulli(torch.tensor(1.0), logits=logits).sample((20000,))
    ref = ref / ref.sum(-1, keepdim=True)
    for q in (0.1, 0.5, 0.9):
        torch.testing.assert_close(ours.quantile(q, 0), ref.quantile(q, 0), atol=0.015, rtol=0)
    assert ours.std(0).min() > 0.05                     # sampling, not the eval weights
    torch.testing.assert_close(ours.sum(-1), torch.ones(20000))


# ------------------------------------------------------------------ ATTEMPT
def random_sources(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"s{i}": torch.empty(4, D).uniform_(-0.5, 0.5, generator=g) for i in range(n)}


def constant_label(label: int):
    """bag_batch inputs, every label `label`: a source tuned on it answers `label` whatever the input."""
    def make(g: torch.Generator) -> dict[str, torch.Tensor]:
        batch = bag_batch(g)
        batch["labels"].fill_(label)
        return batch
    return make


def test_attempt_attention_routes_each_group_of_inputs_to_its_source():
    """The bag task through the default attention: each label's inputs must pick their own source.

    Sources: a prompt tuned to answer 0 for every input, one tuned to answer 1, and a random
    one. On the tiny BERT the classified position is the first prompt token, so a plain prompt
    (with a head) does not learn the bag task (0.54); the input reaches the output through the
    attention, which must weigh the sources differently for the two token groups. Trained at the
    demo's module lr (5e-2) from three router inits. The dot product over T = the keys' spread
    (the previous default) went one-hot in all three (entropy ≤ 0.07) and put every input on
    one candidate in two (accuracy 0.54); the bounded cosine default routes the groups apart.
    """
    srcs = {}
    for label in (0, 1):
        source = ph.attach(tiny.bert(), ph.Prompt(length=4))
        train(source, constant_label(label), 30, 5e-2)
        srcs[f"answers{label}"] = source.adapters["default"]["prompt"].embeddings.detach()
    srcs["random"] = random_sources(1, seed=7)["s0"]
    batch = bag_batch(torch.Generator().manual_seed(99), 256)
    labels = batch.pop("labels")

    def trained(seed: int, temperature) -> tuple[float, torch.Tensor, torch.Tensor]:
        base = tiny.bert()
        torch.manual_seed(seed)                                     # router and target init
        model = ph.compose(base, ph.AttentionMix(srcs, target=ph.Prompt(length=4), temperature=temperature),
                           head=True)
        train(model, bag_batch, 100, 5e-2)
        with torch.no_grad():
            right = (model(**batch).logits.argmax(-1) == labels).float().mean().item()
        module = model.adapters["composed"]["attention_mix"]
        return right, module.last_attention(), module.last_entropy()

    uniform = trained(0, 1e30)[0]                                   # T = ∞: the input-blind control
    for seed in range(3):
        right, a, entropy = trained(seed, "cosine")
        torch.testing.assert_close(entropy, -(a * a.log()).sum(1) / math.log(4))   # last_entropy(), by hand
        winners = [a[labels == y].mean(0).argmax().item() for y in (0, 1)]
        assert right >= 0.9 and right > uniform + 0.3, (seed, right, uniform)
        assert 0.2 < entropy.mean() < 0.8, (seed, entropy.mean())          # neither one-hot nor uniform
        assert winners[0] != winners[1], (seed, winners)                   # the groups pick different sources


# ------------------------------------------------------------------ transfer
def test_a_related_source_outranks_an_unrelated_one():
    """Constructed pair: the target's own task prompt re-noised (related) against an independent prompt."""
    g = torch.Generator().manual_seed(0)
    base = tiny.bert()
    target = ph.attach(base, ph.Prompt(length=4), name="target", head=True)
    mine = target.adapters["target"]["prompt"].embeddings.detach()
    related = mine + 0.7 * mine.std() * torch.randn(mine.shape, generator=g)
    unrelated = torch.empty(mine.shape).uniform_(-0.5, 0.5, generator=g)
    for metric in ("on", "activation_cosine", "cosine_avg", "cosine_tokens", "euclidean"):
        ranking = ph.rank_sources(base, [Example("any", 0)], {"unrelated": unrelated, "related": related}, metric,
                                  target=target)
        assert ranking.names() == ["related", "unrelated"], (metric, ranking.rows)


def test_cosine_tokens_defaults_to_the_papers_per_token_average():
    p, q = torch.randn(3, D), torch.randn(5, D)
    raw = sum(F.cosine_similarity(a, b, 0).item() for a in p for b in q) / 15
    assert cosine_tokens(p, q) == pytest.approx(raw, abs=1e-6)
    assert score_matrix("cosine_tokens", [p], [q])[0, 0].item() == pytest.approx(raw, abs=1e-6)
    assert cosine_tokens(p, p) < 1 - 1e-2                # not normalised to self-similarity 1
