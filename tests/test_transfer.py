"""Transferability: metrics, activations, rank_sources, init_from / distill, evaluate, plots and `pelthub rank`."""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import re
from collections import Counter
from functools import partial

import networkx as nx
import numpy as np
import pytest
import torch
from transformers import BertTokenizer

import pelthub as ph
from pelthub.errors import ConfigError, IncompatibleModuleError
from pelthub.tasks import Example, load_task
from pelthub.training import fit
from pelthub.transfer import (activation_cosine, adjusted_leep, cosine_avg, cosine_tokens, distill, euclidean,
                              evaluate, init_from, leep, on, prompt_activations, rank_sources, score_matrix,
                              zero_shot)
from pelthub.transfer import cli
from pelthub.transfer.evaluate import run_seed, shuffled_labels
from pelthub.transfer.plots import heatmap, similarity_graph
from pelthub.transfer.stats import auc, mean_ci
from tests import tiny

D = 32  # tiny hidden size


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    """A real WordPiece tokenizer over the suite's 91 most frequent words (fits tiny.VOCAB)."""
    words = Counter(w for t in ("sentiment_movies", "topic_news") for e in load_task(t, n_train=64).train
                    for w in re.findall(r"[a-z]+", e.text.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(w for w, _ in words.most_common(tiny.VOCAB - 5))]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def task_data(name: str = "sentiment_movies", n: int = 32):
    return list(load_task(name, n_train=n, n_dev=0, n_test=0).train)


def prompts(n: int, length: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(length, D, generator=g) for i in range(n)}


# ----- metrics -----
@pytest.mark.parametrize("metric", [cosine_avg, partial(cosine_tokens, normalize=True), euclidean])
def test_prompt_metrics_are_symmetric_with_self_similarity_one(metric):
    p, q = prompts(2).values()
    assert metric(p, q) == pytest.approx(metric(q, p), abs=1e-6)
    assert metric(p, p) == pytest.approx(1.0, abs=1e-6)
    assert metric(p, q) < 1 - 1e-3


def test_cosine_formulas():
    p, q = torch.randn(3, D), torch.randn(5, D)          # different lengths are fine for the cosines
    assert cosine_avg(p, q) == pytest.approx(torch.cosine_similarity(p.mean(0), q.mean(0), 0).item(), abs=1e-6)
    raw = sum(torch.cosine_similarity(a, b, 0).item() for a in p for b in q) / 15
    assert cosine_tokens(p, q, normalize=False) == pytest.approx(raw, abs=1e-6)
    assert cosine_tokens(p, p, normalize=False) < 1     # the raw per-token average is not 1 for a prompt with itself
    self_p, self_q = cosine_tokens(p, p, normalize=False), cosine_tokens(q, q, normalize=False)
    assert cosine_tokens(p, q, normalize=True) == pytest.approx(raw / math.sqrt(self_p * self_q), abs=1e-6)
    assert euclidean(p, p + 1) == pytest.approx(1 / (1 + math.sqrt(3 * D)), abs=1e-6)
    with pytest.raises(ConfigError, match="euclidean"):
        euclidean(p, q)


def test_on_on_hand_built_activation_patterns():
    a = torch.tensor([[1.0, -1.0, 0.5, 0.0], [2.0, 3.0, -0.1, 0.0]])    # active: (0,0) (0,2) (1,0) (1,1)
    b = torch.tensor([[0.2, 0.0, -3.0, 0.0], [1.0, -1.0, 0.0, 4.0]])    # active: (0,0) (1,0) (1,3)
    assert on(a, b) == pytest.approx(2 / math.sqrt(4 * 3))
    assert on(a, b, layers=[0]) == pytest.approx(1 / math.sqrt(2 * 1))
    assert on(a, b, layers=slice(1, None)) == pytest.approx(1 / math.sqrt(2 * 2))
    assert on(a, b) == on(b, a) and on(a, a) == 1.0
    assert on(a, torch.zeros(2, 4)) == 0.0                             # nothing active: defined as 0
    assert activation_cosine(a, b) == pytest.approx(torch.cosine_similarity(a.flatten(), b.flatten(), 0).item())
    with pytest.raises(ConfigError, match="layers"):
        on(a, b, layers=[5])
    m = score_matrix("on", torch.stack([a, b]), torch.stack([b, a, a]))
    assert m.shape == (2, 3) and m[0, 0] == pytest.approx(on(a, b)) and m[1, 2] == pytest.approx(on(b, a))


# ----- activations -----
def test_activations_are_the_ffn_intermediate_at_the_filler_and_batching_is_exact():
    base = tiny.bert()
    ps = list(prompts(3).values()) + [torch.randn(6, D)]
    acts = prompt_activations(base, ps, filler_id=4, chunk=2)
    assert acts.shape == (4, 2, 64)
    seen = []
    hooks = [base.get_submodule(f"bert.encoder.layer.{i}.intermediate").register_forward_hook(
        lambda _m, _a, out: seen.append(out)) for i in range(2)]
    x = torch.cat([ps[3], base.get_input_embeddings().weight[4:5]])[None]
    base(inputs_embeds=x)
    for h in hooks:
        h.remove()
    assert torch.allclose(acts[3], torch.stack([s[0, 6] for s in seen]), atol=1e-5)   # GELU(intermediate.dense)
    one = torch.stack([prompt_activations(base, [p], filler_id=4)[0] for p in ps])
    assert torch.allclose(acts, one, atol=1e-5)
    mean = prompt_activations(base, ps[3:], filler_id=4, position="mean")
    assert torch.allclose(mean[0], torch.stack([s[0, :6].mean(0) for s in seen]), atol=1e-5)
    for p, q in [(acts[0], acts[1]), (acts[2], acts[3])]:
        for metric in (on, activation_cosine):
            assert metric(p, q) == pytest.approx(metric(q, p)) and metric(p, p) == pytest.approx(1.0)


@pytest.mark.parametrize("arch", ["roberta", "t5", "gpt2", "llama"])
def test_activations_on_other_families(arch):
    base = tiny.BUILDERS[arch]()
    acts = prompt_activations(base, torch.randn(3, 4, D))
    assert acts.shape == (3, 2, 128 if arch == "gpt2" else 64) and torch.isfinite(acts).all()
    assert base.training is False


# ----- rank_sources -----
def test_rank_is_stable_across_runs_and_top_feeds_attention_mix(tokenizer):
    data = task_data()
    cands = prompts(5)
    runs = [rank_sources(tiny.bert(), data, cands, "on", tokenizer=tokenizer, target_steps=3, seed=7)
            for _ in range(2)]
    assert runs[0].rows == runs[1].rows and len(runs[0]) == 5
    assert [s for _, s in runs[0].rows] == sorted((s for _, s in runs[0].rows), reverse=True)
    top = runs[0].top(2)
    assert list(top) == runs[0].names(2)
    assert all(torch.equal(m.embeddings, cands[n]) for n, m in top.items())
    base = tiny.bert()
    model = ph.compose(base, ph.AttentionMix(top, target=ph.Prompt(length=4)))
    assert model(**tiny.batch("bert")).logits.shape == (3, 2)
    assert json.loads(json.dumps(runs[0].to_dict()))["ranking"][0]["rank"] == 1
    assert runs[0].names(1)[0] in runs[0].table()


@pytest.mark.parametrize("metric", ["activation_cosine", "cosine_avg", "cosine_tokens", "euclidean", "zero_shot"])
def test_every_metric_ranks(tokenizer, metric):
    base = tiny.bert()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ranking = rank_sources(base, task_data(), prompts(3), metric, tokenizer=tokenizer, target_steps=2)
    assert len(ranking) == 3 and not ranking.excluded
    assert all(math.isfinite(s) for _, s in ranking.rows)
    if metric == "zero_shot":
        assert all(0 < s <= 1 for _, s in ranking.rows)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())   # base untouched
    assert all(p.requires_grad for p in base.parameters())                          # flags restored


def test_incompatible_candidates_are_reported_not_dropped(tokenizer, tmp_path):
    base = tiny.bert()
    other_arch = ph.attach(tiny.roberta(), ph.Prompt(length=4))                     # same width, other model
    lora_only = ph.attach(tiny.bert(), ph.LoRA(r=2))
    reg = ph.Registry(tmp_path / "reg")
    reg.add(ph.attach(tiny.bert(), ph.Prompt(length=4)), name="good-prompt")
    reg.add(ph.attach(tiny.roberta(), ph.Prompt(length=4)), name="roberta-prompt")
    cards = {c.ref: c for c in reg.search(kind="prompt")}
    cands = {"ok": torch.randn(4, D), "wide": torch.randn(4, 48), "roberta": other_arch, "lora": lora_only,
             "good-prompt@1": "good-prompt@1", "card": cards["roberta-prompt@1"]}
    ranking = rank_sources(base, task_data(), cands, "cosine_avg", tokenizer=tokenizer, target_steps=2,
                           registry=reg)
    assert sorted(ranking.names()) == ["good-prompt@1", "ok"]
    reasons = dict(ranking.excluded)
    assert set(reasons) == {"wide", "roberta", "lora", "card"}
    assert "48" in reasons["wide"] and "roberta" in reasons["roberta"] and "0 soft prompts" in reasons["lora"]
    assert "roberta-prompt@1" in reasons["card"]
    assert isinstance(ranking.top(2)["good-prompt@1"], ph.modules.prompt.PromptModule)
    assert not any(p._forward_hooks for p in base.modules())                         # registry load detached


def test_euclidean_excludes_other_lengths_and_errors_are_clear(tokenizer):
    cands = {"four": torch.randn(4, D), "six": torch.randn(6, D), "four2": torch.randn(4, D)}
    ranking = rank_sources(tiny.bert(), task_data(), cands, "euclidean", tokenizer=tokenizer, target_steps=2)
    assert sorted(ranking.names()) == ["four", "four2"] and "length 4" in dict(ranking.excluded)["six"]
    with pytest.raises(ConfigError, match="unknown metric"):
        rank_sources(tiny.bert(), task_data(), cands, "nope", tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="num_labels=4"):
        rank_sources(tiny.bert(), task_data("topic_news"), cands, "zero_shot", tokenizer=tokenizer)
    with pytest.raises(IncompatibleModuleError, match="target model"):
        rank_sources(tiny.bert(), task_data(), cands, target=ph.attach(tiny.roberta(), ph.Prompt(length=4)))
    with pytest.raises(ConfigError, match="plain base"):
        rank_sources(ph.attach(tiny.bert(), ph.Prompt(length=4)), task_data(), cands, tokenizer=tokenizer)


def test_zero_shot_is_the_geometric_mean_label_probability_with_the_candidate_in_place(tokenizer):
    """exp(−mean CE) by hand: a second model holding the candidate as its prompt and the target's head."""
    data = task_data(n=24)
    target = ph.attach(tiny.bert(), ph.Prompt(length=4), head=True)
    fit(target, data, tokenizer, steps=5, batch_size=8, lr=0.05, progress=False)
    candidate = torch.randn(4, D)
    other = init_from(ph.attach(tiny.bert(), ph.Prompt(length=4), head=True), candidate)
    other.heads["default"].load_state_dict(target.heads["default"].state_dict())
    batch = tokenizer([e.text for e in data], padding=True, truncation=True, max_length=64, return_tensors="pt")
    other.eval()
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(other(**batch).logits, torch.tensor([e.label for e in data]))
    assert zero_shot(target, candidate, data, tokenizer, batch_size=7) == pytest.approx(math.exp(-ce.item()),
                                                                                         rel=1e-5)
    assert zero_shot(target, candidate, data, tokenizer) != pytest.approx(zero_shot(target, target, data, tokenizer))


def test_zero_shot_ranks_a_prompt_for_the_targets_labels_above_one_for_the_opposite_labels(tokenizer):
    """Constructed pair read through the target's head: prompts trained behind that (frozen) head to give the
    target's label and the other one (the tiny random BERT learns no text task, but a prompt moves its output)."""
    base = tiny.bert()
    spare = copy.deepcopy(base)                                    # the candidates train on a copy of the base
    texts = task_data(n=32)
    zeros, ones = [Example(e.text, 0) for e in texts], [Example(e.text, 1) for e in texts]
    target = ph.attach(base, ph.Prompt(length=4), name="target", head=True)
    fit(target, zeros, tokenizer, steps=30, batch_size=8, lr=0.1, progress=False)
    head = {k: v.detach().clone() for k, v in target.heads["target"].state_dict().items()}
    candidates = {}
    for name, examples in (("a-other-label", ones), ("b-same-label", zeros)):
        torch.manual_seed(1)
        model = ph.attach(spare, ph.Prompt(length=4), name=name, head=True)
        model.heads[name].load_state_dict(head)
        model.heads[name].requires_grad_(False)
        fit(model, examples, tokenizer, steps=30, batch_size=8, lr=0.1, progress=False)
        candidates[name] = model.adapters[name]["prompt"].embeddings.detach().clone()
        model.detach()
    ranking = rank_sources(base, zeros, candidates, "zero_shot", tokenizer=tokenizer, target=target)
    assert ranking.names() == ["b-same-label", "a-other-label"], ranking.rows      # a tie would sort "a" first
    assert ranking.rows[0][1] > 0.9 > 0.1 > ranking.rows[1][1], ranking.rows


def bag_of_words(tokenizer, n: int = 32, seed: int = 0) -> list[Example]:
    """Label 0: 8 words from one 40-word half of the tokenizer's vocabulary, label 1: from the other (learnable
    by a LoRA on the tiny random BERT, unlike the built-in tasks)."""
    words = list(tokenizer.vocab)[5:85]
    rng = random.Random(seed)
    return [Example(" ".join(rng.choice(words[40 * y:40 * (y + 1)]) for _ in range(8)), y) for y in [0, 1] * (n // 2)]


def test_leep_is_nguyen_et_als_formula():
    """LEEP by loops over the definitions (Nguyen et al. 2020, eqs. 1-2), its invariances and its floor."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(20, 3, generator=g).softmax(-1)
    labels = torch.randint(0, 2, (20,), generator=g)
    n = len(labels)
    joint = [[sum(probs[i, z].item() for i in range(n) if labels[i] == y) / n for z in range(3)] for y in range(2)]
    cond = [[joint[y][z] / (joint[0][z] + joint[1][z]) for z in range(3)] for y in range(2)]
    expected = sum(math.log(sum(cond[labels[i]][z] * probs[i, z].item() for z in range(3))) for i in range(n)) / n
    assert leep(probs, labels) == pytest.approx(expected, abs=1e-9)
    assert leep(probs[:, [2, 0, 1]], labels) == pytest.approx(expected, abs=1e-9)   # source label ids: any order
    prior = labels.bincount().double() / n                                           # uninformative source
    assert leep(torch.full((n, 3), 1 / 3), labels) == pytest.approx(float((prior * prior.log()).sum()), abs=1e-6)
    one_hot = torch.nn.functional.one_hot(1 - labels, 2).float()                     # perfect, labels swapped
    assert leep(one_hot, labels) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ConfigError, match="leep needs"):
        leep(probs, labels[:5])


def test_adjusted_leep_removes_the_bias_of_heads_with_more_labels():
    """Unrelated heads: LEEP grows with the head's label count Z on 64 examples (the label map overfits),
    adjusted LEEP stays at 0; a related head keeps a clear positive score; invariances and errors."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (64,), generator=g)
    plain, adjusted = {}, {}
    for z in (2, 4, 8):
        runs = [torch.rand(64, z, generator=g).mul(6).softmax(-1) for _ in range(20)]
        plain[z] = np.mean([leep(p, labels) for p in runs])
        adjusted[z] = np.mean([adjusted_leep(p, labels) for p in runs])
    assert plain[8] > plain[4] > plain[2] + 0.005, plain
    assert all(abs(v) < 0.005 for v in adjusted.values()), adjusted
    related = torch.nn.functional.one_hot(labels, 2).double() * 0.4 + 0.3            # 70 % on the right label
    assert adjusted_leep(related, labels) > 0.05
    assert adjusted_leep(related[:, [1, 0]], labels) == pytest.approx(adjusted_leep(related, labels), abs=1e-12)
    assert adjusted_leep(related, labels, seed=1) == pytest.approx(adjusted_leep(related, labels), abs=0.01)
    with pytest.raises(ConfigError, match="permutations"):
        adjusted_leep(related, labels, permutations=0)


def test_leep_ranks_registry_sources_by_their_own_heads(tokenizer, tmp_path):
    """A source trained on the target's task outranks one trained on shuffled labels and one of another label
    count; headless and prompt-less entries and bare tensors are excluded with the reason; nothing stays attached."""
    data = bag_of_words(tokenizer)
    reg = ph.Registry(tmp_path / "reg")

    def add(name: str, examples, configs=(ph.Prompt(length=4), ph.LoRA(r=4)), head: bool = True,
            labels: int = 2) -> str:
        torch.manual_seed(0)
        model = ph.attach(tiny.bert(num_labels=labels), *configs, head=head)
        fit(model, examples, tokenizer, steps=30, batch_size=8, lr=0.02, progress=False)
        return reg.add(model, name=name)

    same = add("same-task", data)
    shuffled = add("shuffled-labels", shuffled_labels(data, 0))
    refs = [shuffled, same, add("no-head", data, head=False), add("lora", data, [ph.LoRA(r=2)]),
            add("four-labels", task_data("topic_news"), labels=4)]
    base = tiny.bert()
    ranking = rank_sources(base, data, {**{r: r for r in refs}, "tensor": torch.randn(4, D)}, "leep",
                           tokenizer=tokenizer, registry=reg)
    assert ranking.names()[0] == same and set(ranking.names()) == {same, shuffled, "four-labels@1"}, ranking.rows
    assert all(s <= 0 for _, s in ranking.rows)
    reasons = dict(ranking.excluded)
    assert set(reasons) == {"no-head@1", "lora@1", "tensor"}
    assert "no trained head" in reasons["no-head@1"]
    assert "zero_shot" in reasons["tensor"] and "soft prompt" in reasons["lora@1"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    assert isinstance(ranking.best, ph.modules.prompt.PromptModule)
    with pytest.raises(ConfigError, match="no target"):
        rank_sources(base, data, refs, "leep", tokenizer=tokenizer, registry=reg, target=ph.Prompt(length=4))


def test_zero_shot_restores_the_target_prompt(tokenizer):
    model = ph.attach(tiny.bert(), ph.Prompt(length=4), head=True)
    before = model.adapters["default"]["prompt"].embeddings
    score = zero_shot(model, torch.randn(6, D), task_data(), tokenizer)
    assert 0 < score <= 1 and model.adapters["default"]["prompt"].embeddings is before


# ----- transfer methods -----
def test_init_from_copies_and_checks_length():
    source = torch.randn(4, D)
    model = init_from(ph.attach(tiny.bert(), ph.Prompt(length=4)), ph.attach(tiny.bert(), ph.Prompt(length=4)))
    model = init_from(model, source)
    assert torch.equal(model.adapters["default"]["prompt"].embeddings.detach(), source)
    with pytest.raises(ConfigError, match="fit='cycle'"):
        init_from(ph.attach(tiny.bert(), ph.Prompt(length=6)), source)
    cycled = init_from(ph.attach(tiny.bert(), ph.Prompt(length=6)), source, fit="cycle")
    assert torch.equal(cycled.adapters["default"]["prompt"].embeddings.detach(), source[[0, 1, 2, 3, 0, 1]])


def _student():
    torch.manual_seed(3)
    return ph.attach(tiny.bert(seed=1), ph.Prompt(length=4), head=True)


def test_distill_with_beta_zero_is_plain_prompt_tuning(tokenizer):
    data, teacher = task_data(), ph.attach(tiny.bert(), ph.Prompt(length=4), head=True)
    plain, student = _student(), _student()
    expected = fit(plain, data, tokenizer, steps=4, batch_size=8, lr=0.05, seed=2, progress=False)
    got = distill(student, teacher, data, tokenizer, beta=0.0, steps=4, batch_size=8, lr=0.05, seed=2)
    assert got == expected
    for (name, p), (_, q) in zip(plain.module_parameters(), student.module_parameters()):
        assert torch.equal(p, q), name


def test_distill_keeps_the_teacher_frozen_and_beta_matters(tokenizer):
    data, teacher = task_data(), ph.attach(tiny.bert(), ph.Prompt(length=4), head=True)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = {n: p.requires_grad for n, p in teacher.named_parameters()}
    zero = distill(_student(), teacher, data, tokenizer, beta=0.0, steps=3, batch_size=8, lr=0.05)
    ones = distill(_student(), teacher, data, tokenizer, beta=1.0, steps=3, batch_size=8, lr=0.05)
    assert ones[0] > zero[0]                                    # the MSE term adds to the first step's loss
    assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())
    assert {n: p.requires_grad for n, p in teacher.named_parameters()} == flags
    with pytest.raises(ConfigError, match="separate"):
        distill(teacher, teacher, data, tokenizer, beta=1.0, steps=1)
    on_teacher_base = ph.ModularModel(teacher.base).add("s", [ph.Prompt(length=4)])
    with pytest.raises(ConfigError, match="separate"):
        distill(on_teacher_base, teacher, data, tokenizer, beta=1.0, steps=1)


# ----- evaluate, plots -----
def test_evaluate_reports_every_metric_with_controls(tokenizer, tmp_path):
    sources = ["sentiment_movies", "sentiment_products", "topic_news"]
    targets = ["sentiment_hotels", "sentiment_products"]               # a target among the sources skips itself
    study = evaluate(lambda k: tiny.bert(num_labels=k), tokenizer, sources, targets, seeds=2, source_seeds=1,
                     source_steps=3, target_steps=2, prompt=ph.Prompt(length=3), batch_size=8, n_train=16, shots=8,
                     n_dev=8, progress=False)
    assert study.transferred.shape == study.zero_shot.shape == (3, 2, 2) and study.baseline.shape == (2, 2)
    assert np.isnan(study.transferred[1, 1]).all() and not np.isnan(study.transferred[0]).any()
    assert np.isnan(study.zero_shot[2]).all()                           # 4 labels: no shared head, no zero-shot
    assert not np.isnan(study.shuffled).any() and not np.isnan(study.vocab).any()
    assert set(study.scores) == set(study.ranking()) == {"on", "activation_cosine", "cosine_avg", "cosine_tokens",
                                                          "euclidean", "zero_shot", "leep", "adjusted_leep"}
    leep_scores = study.scores["leep"]                                  # the 4-label head too; NaN: a task with itself
    assert np.isnan(leep_scores[1, 1]).all() and (leep_scores[[0, 2]] <= 0).all() and (leep_scores[:, 0] <= 0).all()
    assert study.ranking()["on"]["auc"] in (0.0, 0.5, 1.0)              # one same-family vs one other per target
    assert len(study.conditions()["SPoT, same-family source"]) == 4 and "AUC same vs other" in study.table()
    assert json.loads(json.dumps(study.to_dict()))["targets"] == targets
    graph = similarity_graph(sources, np.array([[1.0 if study.families[a] == study.families[b] else 0.0
                                                 for b in sources] for a in sources]), threshold=0.5,
                             families=[study.families[s] for s in sources])
    assert set(graph.edges) == {("sentiment_movies", "sentiment_products")}
    fig = heatmap(study.transferred[:, :, 0], sources, targets, "SPoT accuracy", path=tmp_path / "spot.png")
    assert (tmp_path / "spot.png").stat().st_size > 0 and fig.axes
    nx.write_graphml(graph, tmp_path / "tasks.graphml")
    assert nx.read_graphml(tmp_path / "tasks.graphml").nodes["topic_news"]["family"] == "topic"


def test_each_run_starts_from_its_own_prompt_and_head():
    assert len({run_seed(role, "sentiment_hotels", r) for role in ("random", "vocab") for r in range(3)}) == 6


def test_shuffled_labels_keep_inputs_and_balance():
    data = task_data(n=40)
    shuffled = shuffled_labels(data, seed=0)
    assert [e.text for e in shuffled] == [e.text for e in data]
    assert Counter(e.label for e in shuffled) == Counter(e.label for e in data)
    assert [e.label for e in shuffled] != [e.label for e in data]


def test_study_statistics():
    m, h, n = mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and h == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)   # t(0.975, 2)
    assert auc([3, 2], [1, 2]) == pytest.approx((1 + 1 + 1 + 0.5) / 4)


# ----- CLI -----
def test_cli_rank_json(tokenizer, tmp_path, capsys):
    model_dir = tmp_path / "base"
    tiny.bert().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "target.jsonl"
    data.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in task_data()))
    reg = ph.Registry(tmp_path / "reg")
    for i in range(3):
        torch.manual_seed(i)
        reg.add(ph.attach(tiny.bert(), ph.Prompt(length=4), head=i < 2), name=f"src{i}")   # src2: no head
    parser = argparse.ArgumentParser()
    parser.add_argument("--registry")
    parser.add_argument("--json", action="store_true")
    cli.add_arguments(parser)
    argv = ["--base", str(model_dir), "--target", str(data), "--registry", str(tmp_path / "reg"), "--top", "2",
            "--steps", "2", "--layers=-1:", "--json"]
    assert cli.run(parser.parse_args([*argv, "--metric", "adjusted_leep"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "adjusted_leep" and {r["name"] for r in out["ranking"]} == {"src0@1", "src1@1"}
    assert "no trained head" in json.dumps(out["excluded"])
    assert cli.run(parser.parse_args(argv)) == 0                      # the default: zero_shot ranks headless ones
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "zero_shot" and len(out["ranking"]) == 2
    assert {r["name"] for r in out["ranking"]} <= {"src0@1", "src1@1", "src2@1"}


def test_target_seeds_average_the_scores_of_one_seed_runs(tokenizer):
    data, cands = task_data(), prompts(3, length=3)
    one = [dict(rank_sources(tiny.bert(), data, cands, "cosine_avg", tokenizer=tokenizer, target_steps=2, seed=s).rows)
           for s in (4, 5)]
    both = dict(rank_sources(tiny.bert(), data, cands, "cosine_avg", tokenizer=tokenizer, target_steps=2, seed=4,
                             target_seeds=2).rows)
    assert both == pytest.approx({n: (one[0][n] + one[1][n]) / 2 for n in cands}, abs=1e-6)
    assert one[0] != pytest.approx(one[1], abs=1e-6)        # the seeds do give different task embeddings
    with pytest.raises(ConfigError, match="target_seeds"):
        rank_sources(tiny.bert(), data, cands, "on", target=ph.attach(tiny.bert(), ph.Prompt(length=3)),
                     target_seeds=2)
