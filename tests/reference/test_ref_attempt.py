"""ATTEMPT against the paper's formula computed from the module's weights (ALGORITHMS.md §3, routing/attention.py).

    x̂ = max_t X (padding masked);  z = LN(W_up·SiLU(W_down·x̂));  p̂_j = max over P_j's tokens
    a = softmax_j(p̂_j·z / T) over C = {P_1..P_S, P_tgt};  P_inst = P_tgt + Σ_{j∈C} a_j P_j
    default scores: a = softmax_j(2·cos(z, p̂_j − mean_k p̂_k))  (the module docstring says why)
The reference runs the base on [P_inst; X] with L ones before the mask.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pelthub as ph
from pelthub.routing.attention import AttentionMixModule
from tests import tiny
from tests.reference.handmade import WordTokenizer, logits

D = 32


def sources(count: int, length: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"s{i}": torch.randn(length, D, generator=g) for i in range(count)}


def mix_of(model) -> AttentionMixModule:
    (module,) = [m for m in model.modules() if isinstance(m, AttentionMixModule)]
    return module


def spread_router(module: AttentionMixModule, seed: int = 0) -> None:
    """Router and target values far from their init, so the attention is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*module.router.parameters(), module.targets]:
            p.copy_(torch.randn(p.shape, generator=g))


def pool(x: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """Max or mean over positions of (B, n, d) where mask is 1, by hand."""
    rows = []
    for b in range(x.shape[0]):
        keep = x[b] if mask is None else x[b][mask[b].bool()]
        rows.append(keep.max(0).values if how == "max" else keep.mean(0))
    return torch.stack(rows)


def reference(module: AttentionMixModule, src: list[torch.Tensor], target: torch.Tensor, base, batch,
              temperature: float | str, how: str = "max", mask_padding: bool = True):
    """(logits, a) of the paper's formula (of the cosine default for "cosine"); target (B, L, d) is each
    example's P_tgt."""
    state = module.state_dict()
    embeds = base.get_input_embeddings()(batch["input_ids"])
    mask = batch["attention_mask"]
    x_hat = pool(embeds, mask if mask_padding else None, how)
    hidden = F.silu(x_hat @ state["router.0.weight"].T) @ state["router.2.weight"].T
    z = F.layer_norm(hidden, (D,), state["router.3.weight"], state["router.3.bias"])
    rows, weights = [], []
    for b in range(z.shape[0]):
        candidates = [*src, target[b]]
        keys = torch.stack([pool(p[None], None, how)[0] for p in candidates])
        if temperature == "cosine":
            centred = keys - keys.mean(0)
            a = torch.softmax(2 * F.cosine_similarity(centred, z[b][None], dim=1), 0)
        else:
            a = torch.softmax(keys @ z[b] / temperature, 0)
        rows.append(target[b] + sum(a_j * p for a_j, p in zip(a, candidates)))
        weights.append(a)
    p_inst = torch.stack(rows)
    widened = torch.cat([torch.ones(mask.shape[0], p_inst.shape[1], dtype=mask.dtype), mask], 1)
    return logits(base, inputs_embeds=torch.cat([p_inst, embeds], 1), attention_mask=widened), torch.stack(weights)


@pytest.mark.parametrize("temperature", ["cosine", None, 2.0])
def test_attempt_equals_the_paper_formula(temperature):
    src = sources(3)
    model = ph.compose(tiny.bert(), ph.AttentionMix(src, target=ph.Prompt(length=3), temperature=temperature))
    module = mix_of(model)
    spread_router(module)
    batch = tiny.batch("bert")
    got = logits(model, **batch)
    t = temperature or D * math.e                                    # "cosine" is the default
    expected, a = reference(module, list(src.values()), module.targets.detach().expand(3, -1, -1), tiny.bert(),
                            batch, t)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.last_attention(), a, atol=1e-6, rtol=1e-5)
    if temperature == 2.0:
        assert a.max() > 0.5 and (a.max(1).values - a.min(1).values).min() > 0.1     # far from uniform: T matters


def test_default_weights_stay_bounded_however_large_router_and_target_grow():
    """Cosine scores lie in [-2, 2]: no weight passes e^4 / (e^4 + S) (S = 3 here), where T = 2 goes one-hot."""
    src = sources(3)
    weights = {}
    for temperature in ("cosine", 2.0):
        model = ph.compose(tiny.bert(), ph.AttentionMix(src, target=ph.Prompt(length=3), temperature=temperature))
        module = mix_of(model)
        spread_router(module)
        with torch.no_grad():
            module.router[3].weight.mul_(100)                        # LayerNorm gain and target key run away
            module.targets.mul_(100)
        logits(model, **tiny.batch("bert"))
        weights[temperature] = module.last_attention()
    assert weights["cosine"].max() <= math.exp(4) / (math.exp(4) + 3) + 1e-6
    assert weights[2.0].max() > 0.999


def test_no_sources_doubles_the_target_prompt():
    model = ph.compose(tiny.bert(), ph.AttentionMix([], target=ph.Prompt(length=2)))
    module = mix_of(model)
    batch = tiny.batch("bert")
    embeds = tiny.bert().get_input_embeddings()(batch["input_ids"])
    p = 2 * module.targets.detach().expand(3, -1, -1)
    mask = torch.cat([torch.ones(3, 2, dtype=torch.long), batch["attention_mask"]], 1)
    expected = logits(tiny.bert(), inputs_embeds=torch.cat([p, embeds], 1), attention_mask=mask)
    torch.testing.assert_close(logits(model, **batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how,mask_padding", [("mean", True), ("max", False), ("mean", False)])
def test_pool_and_mask_padding_arguments(how, mask_padding):
    src = sources(2)
    model = ph.compose(tiny.bert(), ph.AttentionMix(src, target=ph.Prompt(length=3), temperature=8.0, pool=how,
                                                    mask_padding=mask_padding))
    module = mix_of(model)
    spread_router(module, seed=1)
    batch = tiny.batch("bert")
    got = logits(model, **batch)
    expected, a = reference(module, list(src.values()), module.targets.detach().expand(3, -1, -1), tiny.bert(),
                            batch, 8.0, how, mask_padding)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.last_attention(), a, atol=1e-6, rtol=1e-5)
    _, other = reference(module, list(src.values()), module.targets.detach().expand(3, -1, -1), tiny.bert(), batch,
                         8.0, how, not mask_padding)
    assert not torch.allclose(a[-1], other[-1], atol=1e-4)          # the padded example sees the difference


def test_tasks_select_each_examples_target_prompt():
    src = sources(2)
    model = ph.compose(tiny.bert(), ph.AttentionMix(src, target=ph.Prompt(length=3), tasks=["x", "y"],
                                                    temperature=1.0))
    module = mix_of(model)
    spread_router(module, seed=2)
    assert module.targets.shape == (2, 3, D)
    batch = tiny.batch("bert")
    got = logits(model, **batch, task_ids=["y", "x", "y"])
    targets = module.targets.detach()[torch.tensor([1, 0, 1])]
    expected, _ = reference(module, list(src.values()), targets, tiny.bert(), batch, 1.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bottleneck_init_from_and_target_arguments():
    src = sources(2, length=4)
    module = mix_of(ph.compose(tiny.bert(), ph.AttentionMix(src, target=ph.Prompt(length=4), bottleneck=7,
                                                            init_from="s1")))
    assert module.router[0].weight.shape == (7, D) and module.router[2].weight.shape == (D, 7)
    assert torch.equal(module.targets[0], src["s1"])
    text = ph.AttentionMix(src, target=ph.Prompt(length=4, init="text", text="two words"))
    got = mix_of(ph.compose(tiny.bert(), text, tokenizer=WordTokenizer())).targets[0]
    emb = tiny.bert().get_input_embeddings().weight
    assert torch.equal(got, emb[torch.tensor(WordTokenizer()("two words")["input_ids"] * 2)])


def test_fit_sources_truncates_pads_and_pools_only_real_tokens():
    g = torch.Generator().manual_seed(5)
    long, short = torch.randn(5, D, generator=g), -1 - torch.rand(2, D, generator=g)   # short: all negative
    model = ph.compose(tiny.bert(), ph.AttentionMix({"long": long, "short": short}, target=ph.Prompt(length=3),
                                                    temperature=1.0, fit_sources=True))
    module = mix_of(model)
    spread_router(module, seed=3)
    fitted = [long[:3], torch.cat([short, torch.zeros(1, D)])]
    torch.testing.assert_close(module.sources.detach(), torch.stack(fitted))
    # keys pooled over the tokens a source contributes: the short one's max is negative, not the padding's 0
    torch.testing.assert_close(module.source_keys.detach(), torch.stack([long[:3].max(0).values, short.max(0).values]))
    batch = tiny.batch("bert")
    state = module.state_dict()
    embeds = tiny.bert().get_input_embeddings()(batch["input_ids"])
    x_hat = pool(embeds, batch["attention_mask"], "max")
    z = F.layer_norm(F.silu(x_hat @ state["router.0.weight"].T) @ state["router.2.weight"].T, (D,),
                     state["router.3.weight"], state["router.3.bias"])
    target = module.targets.detach()[0]
    keys = torch.stack([long[:3].max(0).values, short.max(0).values, target.max(0).values])
    a = torch.softmax(z @ keys.T, -1)
    p_inst = target + torch.einsum("bs,sld->bld", a, torch.stack([*fitted, target]))
    mask = torch.cat([torch.ones(3, 3, dtype=torch.long), batch["attention_mask"]], 1)
    expected = logits(tiny.bert(), inputs_embeds=torch.cat([p_inst, embeds], 1), attention_mask=mask)
    torch.testing.assert_close(logits(model, **batch), expected, atol=1e-5, rtol=1e-5)
