"""rank_sources on generative targets: each metric against its formula computed here by hand.

References run one candidate and one example at a time on unpadded inputs (`target_logprobs` reads the
target's log-probabilities off the logits), prototypes come from a full SVD of ΔW = B·A, and the
routing weights, LEEP joint and retrieval cosines are summed in Python loops.
"""
import math

import pytest
import torch

import pelthub as ph
from pelthub.errors import ConfigError, DataError
from pelthub.model import ModularModel
from pelthub.modules.base import site_name
from pelthub.tasks import Example
from pelthub.tasks.generative import GenerativeExample as G
from pelthub.transfer.generative import retrieval_keys
from tests import tiny
from tests.test_generative import DATA, target_logprobs, tok  # noqa: F401  (tok: the word-level tokenizer fixture)
from tests.tiny import perturb

BUILDERS = {"gpt2": tiny.gpt2, "llama": tiny.llama, "t5": tiny.t5}
KINDS = {"lora": [ph.LoRA(r=2)], "ia3": [ph.IA3()], "double": [ph.LoRA(r=4, targets=("o", "up"))],
         "prompt": [ph.Prompt(length=3)], "lora.ia3": [ph.LoRA(r=2), ph.IA3()]}  # names no module attribute may take
LORAS = {"l1": [ph.LoRA(r=2)], "l2": [ph.LoRA(r=2)], "l3": [ph.LoRA(r=2)], "l4": [ph.LoRA(r=2)],
         "l5": [ph.LoRA(r=4, targets=("o", "up"))]}  # 4 on the default sites: Arrow's top 3 leaves one out


def source(arch: str, configs, seed: int) -> ModularModel:
    """One module set on its own fresh base, moved off its initial values."""
    model = ph.attach(BUILDERS[arch](), *configs)
    perturb(model, seed=seed, scale=0.5)
    return model.eval()


def sources(arch: str, kinds=KINDS) -> dict[str, ModularModel]:
    return {name: source(arch, configs, seed) for seed, (name, configs) in enumerate(kinds.items(), 1)}


def hand_likelihood(model, arch, tok, data) -> float:
    return float(torch.cat([target_logprobs(model, arch, tok, e) for e in data]).mean())


def hand_choice_leep(model, arch, tok, data) -> float:
    theta = [torch.softmax(torch.stack([target_logprobs(model, arch, tok, G(e.input, c)).mean() for c in e.choices]), 0)
             for e in data]
    answers = [e.choices.index(e.target) for e in data]
    n, width = len(data), max(len(e.choices) for e in data)
    joint = [[sum(float(t[z]) for t, y_i in zip(theta, answers) if y_i == y and z < len(t)) / n for z in range(width)]
             for y in range(width)]
    given = [[joint[y][z] / sum(joint[u][z] for u in range(width)) for z in range(width)] for y in range(width)]
    return sum(math.log(sum(given[y][z] * float(t[z]) for z in range(len(t)))) for t, y in zip(theta, answers)) / n


def hand_hidden(base, arch, tok, data, site: str) -> torch.Tensor:
    """Inputs (tokens, in) of `site` when `base` reads each example's input alone (T5's decoder reads it too)."""
    found = []
    hook = base.get_submodule(site).register_forward_hook(lambda _m, args, _o: found.append(args[0][0].double()))
    with torch.no_grad():
        for e in data:
            ids = torch.tensor([tok(e.input)["input_ids"]])
            base(input_ids=ids, **({"decoder_input_ids": ids} if arch == "t5" else {}))
    hook.remove()
    return torch.cat(found)


def hand_prototypes(model: ModularModel) -> dict[str, torch.Tensor]:
    lora = model.adapters["default"]["lora"]
    return {site_name(k): torch.linalg.svd((layer.lora_b @ layer.lora_a).detach().double())[2][0]
            for k, layer in lora.layers.items()}


def hand_routing(base, arch, tok, data, models: dict[str, ModularModel], top_k: int = 3) -> dict[str, float]:
    protos = {n: hand_prototypes(m) for n, m in models.items()}
    sites = sorted({s for p in protos.values() for s in p})
    mass, pairs = dict.fromkeys(models, 0.0), 0
    for site in sites:
        there = [n for n in models if site in protos[n]]
        for h in hand_hidden(base, arch, tok, data, site):
            scores = {n: abs(float(h @ protos[n][site])) for n in there}
            chosen = sorted(there, key=lambda n: -scores[n])[:min(top_k, len(there))]
            total = sum(math.exp(scores[n]) for n in chosen)
            for n in chosen:
                mass[n] += math.exp(scores[n]) / total
            pairs += 1
    return {n: m / pairs for n, m in mass.items()}


def hand_keys(base, arch, tok, data, models: dict[str, ModularModel]) -> dict[str, float]:
    protos = {n: hand_prototypes(m) for n, m in models.items()}
    hidden = {site: hand_hidden(base, arch, tok, data, site) for site in {s for p in protos.values() for s in p}}
    out = {}
    for n, p in protos.items():
        per_site = []
        for site, v in p.items():
            h = hidden[site]
            per_site.append(sum(abs(float(x @ v) / float(x.norm() * v.norm())) for x in h) / len(h))
        out[n] = sum(per_site) / len(per_site)
    return out


def assert_ranked(ranking, expected: dict[str, float], tol: float = 1e-4) -> None:
    assert ranking.names() == sorted(expected, key=lambda n: (-expected[n], n))
    for name, score in ranking.rows:
        assert score == pytest.approx(expected[name], rel=tol, abs=tol), name


# ------------------------------------------------------------------ each metric is its formula
@pytest.mark.parametrize("arch", BUILDERS)
def test_likelihood_is_the_mean_target_log_likelihood_of_every_kind_of_set(arch, tok):
    models = sources(arch)
    base = BUILDERS[arch]()
    on_base = ph.attach(base, ph.LoRA(r=2))  # attached to the ranked base itself: steps aside while ranking
    perturb(on_base, seed=9, scale=0.5)
    candidates = {**models, "module": models["lora"].adapters["default"]["lora"],
                  "tensor": models["prompt"].adapters["default"]["prompt"].embeddings.detach(), "on_base": on_base}
    expected = {n: hand_likelihood(m, arch, tok, DATA) for n, m in models.items()}
    expected.update(module=expected["lora"], tensor=expected["prompt"],
                    on_base=hand_likelihood(on_base.eval(), arch, tok, DATA))
    ranking = ph.rank_sources(base, DATA, candidates, tokenizer=tok, chunk=2)
    assert ranking.metric == "likelihood" and not ranking.excluded
    assert_ranked(ranking, expected)


@pytest.mark.parametrize("arch", BUILDERS)
def test_choice_leep_is_leep_over_softmaxed_length_normalised_choice_scores(arch, tok):
    models = sources(arch)
    expected = {n: hand_choice_leep(m, arch, tok, DATA) for n, m in models.items()}
    ranking = ph.rank_sources(BUILDERS[arch](), DATA, models, "choice_leep", tokenizer=tok)
    assert_ranked(ranking, expected)


@pytest.mark.parametrize("arch", BUILDERS)
def test_arrow_routing_is_the_mean_arrow_weight_and_excludes_sets_without_a_lora(arch, tok):
    models = sources(arch, LORAS)
    base = BUILDERS[arch]()
    expected = hand_routing(base, arch, tok, DATA, models)
    assert sum(expected.values()) == pytest.approx(1.0)
    ranking = ph.rank_sources(base, DATA, {**models, "prompt": source(arch, KINDS["prompt"], 7)}, "arrow_routing",
                              tokenizer=tok)
    assert_ranked(ranking, expected)
    assert [n for n, _ in ranking.excluded] == ["prompt"] and "LoRA" in ranking.excluded[0][1]


def test_registry_refs_of_any_kind_rank_as_their_modules(tok, tmp_path):
    models = sources("gpt2", {k: KINDS[k] for k in ("lora", "ia3", "prompt")})
    registry = ph.Registry(tmp_path / "reg")
    refs = {registry.add(m, name=f"src-{n}"): n for n, m in models.items()}
    ranking = ph.rank_sources(tiny.gpt2(), DATA, list(refs), tokenizer=tok, registry=registry)
    assert_ranked(ranking, {ref: hand_likelihood(models[n], "gpt2", tok, DATA) for ref, n in refs.items()})
    assert ranking.top(1) == {ranking.names(1)[0]: ranking.names(1)[0]}


# ------------------------------------------------------------------ shortlist (registry scale)
@pytest.mark.parametrize("arch", BUILDERS)
def test_retrieval_keys_are_the_mean_absolute_cosine_with_the_target_tokens(arch, tok):
    models = sources(arch, LORAS)
    base = BUILDERS[arch]()
    expected = hand_keys(base, arch, tok, DATA, models)
    from pelthub.transfer.generative import hidden_states, prototypes
    sigs = [prototypes(dict(m.adapters["default"])) for m in models.values()]
    hidden = hidden_states(base, tok, DATA, sorted({s for p in sigs for s in p}), 2, 128)
    assert retrieval_keys(hidden, sigs).tolist() == pytest.approx(list(expected.values()), rel=1e-5)


def test_shortlist_scores_the_top_k_keys_and_equals_exhaustive_when_k_covers_all(tok, tmp_path):
    models = sources("gpt2", LORAS)
    registry = ph.Registry(tmp_path / "reg")
    refs = {registry.add(m, name=n): n for n, m in models.items()}
    base = tiny.gpt2()
    exhaustive = ph.rank_sources(base, DATA, list(refs), tokenizer=tok, registry=registry)
    assert ph.rank_sources(base, DATA, list(refs), tokenizer=tok, registry=registry, shortlist=len(refs)).rows \
        == exhaustive.rows
    keys = hand_keys(base, "gpt2", tok, [G(f"{e.input} {e.target}", e.target) for e in DATA], models)
    top2 = sorted(refs, key=lambda r: -keys[refs[r]])[:2]
    short = ph.rank_sources(base, DATA, list(refs), tokenizer=tok, registry=registry, shortlist=2)
    assert sorted(short.names()) == sorted(top2)
    assert short.rows == [row for row in exhaustive.rows if row[0] in top2]
    long = [G("a", "1 2 3 4 5 6 7 8 9"), G("b", "10 11 12 13 14 15 16")]  # its inputs alone pick another top 2
    keys = hand_keys(base, "gpt2", tok, [G(f"{e.input} {e.target}", e.target) for e in long], models)
    short = ph.rank_sources(base, long, list(refs), tokenizer=tok, registry=registry, shortlist=2)
    assert sorted(short.names()) == sorted(sorted(refs, key=lambda r: -keys[refs[r]])[:2])


# ------------------------------------------------------------------ errors
def test_mismatched_data_metrics_and_candidates_give_clear_errors(tok):
    models = sources("gpt2", {"lora": KINDS["lora"]})
    free = [G("a b", "c"), G("d", "e f")]
    with pytest.raises(DataError, match="choice_leep needs answer choices.*examples \\[0, 1\\]"):
        ph.rank_sources(tiny.gpt2(), free, models, "choice_leep", tokenizer=tok)
    with pytest.raises(ConfigError, match="ranks classification targets.*likelihood"):
        ph.rank_sources(tiny.gpt2(), DATA, models, "adjusted_leep", tokenizer=tok)
    with pytest.raises(ConfigError, match="need GenerativeExample targets"):
        ph.rank_sources(tiny.bert(), [Example("a b", 0)], models, "likelihood", tokenizer=tok)
    with pytest.raises(ConfigError, match="causal LM or seq2seq base.*BertForSequenceClassification"):
        ph.rank_sources(tiny.bert(), DATA, models, tokenizer=tok)
    with pytest.raises(ConfigError, match="target_data is empty"):
        ph.rank_sources(tiny.gpt2(), [], models, tokenizer=tok)
    with pytest.raises(ConfigError, match="shortlist must be a positive int"):
        ph.rank_sources(tiny.gpt2(), DATA, models, tokenizer=tok, shortlist=0)
    two = source("gpt2", KINDS["lora"], 1).add("other", [ph.IA3()])
    ranking = ph.rank_sources(tiny.gpt2(), DATA, {"two": two, "bad": "x"}, tokenizer=tok)
    assert ranking.rows == [] and "holds 2 module sets" in dict(ranking.excluded)["two"]
