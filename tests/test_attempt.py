"""ATTEMPT (AttentionMix): identities, weights, gradients, parameter count, lengths, tasks, save/load."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import pelthub as ph
from pelthub.errors import ConfigError, NotFoundError, RoutingError
from pelthub.modules.base import CallContext, CallState
from pelthub.modules.config import config_from_dict
from pelthub.routing.attention import AttentionMixConfig
from tests import tiny

D = 32  # width of the tiny models


def sources(n, length=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"s{i}": torch.empty(length, D).uniform_(-0.5, 0.5, generator=g) for i in range(n)}


def mix(model, name="composed"):
    return model.adapters[name]["attention_mix"]


def run(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


def explicit(module, embeds, mask, task_ids=None):
    """P_inst computed example by example, straight from the formula."""
    out, weights = [], []
    for b in range(embeds.shape[0]):
        x = embeds[b][mask[b].bool()].amax(0)
        z = module.router(x)
        tgt = module.targets[0 if task_ids is None else task_ids[b]]
        cands = [*module.sources, tgt]
        keys = torch.stack([c.amax(0) for c in cands])
        if module.temperature is None:  # the default: 2 · cosine to the keys centred on their mean
            keys = keys - keys.mean(0)
            a = torch.softmax(torch.stack([2 * (k @ z) / (k.norm() * z.norm()) for k in keys]), 0)
        else:
            a = torch.softmax(torch.stack([k @ z for k in keys]) / module.temperature, 0)
        out.append(tgt + sum(a_j * c for a_j, c in zip(a, cands)))
        weights.append(a)
    return torch.stack(out), torch.stack(weights)


@pytest.mark.parametrize("arch", ["bert", "t5", "gpt2"])
def test_zero_sources_is_prompt_tuning_with_twice_the_target(arch):
    base, inputs = tiny.BUILDERS[arch](), tiny.batch(arch)
    model = ph.compose(base, ph.AttentionMix([], target=ph.Prompt(length=4)))
    m = mix(model)
    embeds = base.get_input_embeddings()(inputs["input_ids"])
    assert torch.equal(m.prompt(embeds, inputs["attention_mask"], CallContext()), 2 * m.targets.expand(3, -1, -1))
    expected = run(model, inputs)
    plain = ph.attach(model.detach(), ph.Prompt(length=4))
    with torch.no_grad():
        plain.adapters["default"]["prompt"].embeddings.copy_(2 * m.targets[0])
    assert torch.equal(run(plain, inputs), expected)


def test_infinite_temperature_gives_the_uniform_mixture_plus_the_target():
    src = sources(3)
    model = ph.compose(tiny.bert(), ph.AttentionMix(src, target=ph.Prompt(length=4), temperature=1e30))
    m, inputs = mix(model), tiny.batch("bert")
    embeds = model.base.get_input_embeddings()(inputs["input_ids"])
    got = m.prompt(embeds, inputs["attention_mask"], CallContext())
    tgt = m.targets[0]
    torch.testing.assert_close(m.last_attention(), torch.full((3, 4), 0.25))
    torch.testing.assert_close(got, (tgt + (sum(src.values()) + tgt) / 4).expand(3, -1, -1))


def test_weights_sum_to_one_differ_between_inputs_and_match_the_formula():
    model = ph.compose(tiny.bert(), ph.AttentionMix(sources(4), target=ph.Prompt(length=4)))
    m, inputs = mix(model), tiny.batch("bert")
    run(model, inputs)
    a = m.last_attention()
    assert a.shape == (3, 5) and m.candidates == ["s0", "s1", "s2", "s3", "<target>"]
    torch.testing.assert_close(a.sum(-1), torch.ones(3))
    assert not torch.allclose(a[0], a[1], atol=1e-6, rtol=0)
    assert m.config.temperature == "cosine" and m.temperature is None
    embeds = model.base.get_input_embeddings()(inputs["input_ids"])
    paper = mix(ph.compose(tiny.bert(), ph.AttentionMix(sources(4), target=ph.Prompt(length=4), temperature=None)))
    assert paper.temperature == pytest.approx(D * math.e)
    for module in (m, paper):
        want_p, want_a = explicit(module, embeds, inputs["attention_mask"])
        torch.testing.assert_close(module.prompt(embeds, inputs["attention_mask"], CallContext()), want_p)
        torch.testing.assert_close(module.last_attention(), want_a.detach())


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_padding_does_not_change_the_weights(pool):
    model = ph.compose(tiny.bert(), ph.AttentionMix(sources(3), target=ph.Prompt(length=4), pool=pool))
    ids = torch.randint(3, tiny.VOCAB, (2, 5))
    short = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pad = torch.randint(3, tiny.VOCAB, (2, 4))  # arbitrary ids under a zero mask
    long = {"input_ids": torch.cat([ids, pad], 1),
            "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros_like(pad)], 1)}
    run(model, short)
    a = mix(model).last_attention()
    run(model, long)
    torch.testing.assert_close(mix(model).last_attention(), a, atol=1e-7, rtol=0)
    unmasked = ph.ModularModel(tiny.bert()).add("composed", [mix(model).config.replace(mask_padding=False)], init=False)
    unmasked.adapters["composed"].load_state_dict(model.adapters["composed"].state_dict())
    run(unmasked, long)
    assert not torch.allclose(mix(unmasked).last_attention(), a, atol=1e-7, rtol=0)


def test_gradients_reach_router_and_target_only():
    src = sources(3)
    given = {k: v.clone() for k, v in src.items()}
    model = ph.compose(tiny.bert(), ph.AttentionMix(src, target=ph.Prompt(length=4)))
    model.train()
    model(**tiny.batch("bert")).logits.pow(2).mean().backward()
    m = mix(model)
    assert m.sources.grad is None and m.source_keys.grad is None
    assert not m.sources.requires_grad and not m.source_keys.requires_grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [m.targets, *m.router.parameters()])
    assert all(p.grad is None for p in model.base.parameters())
    assert all(torch.equal(src[k], given[k]) for k in src)  # the caller's tensors are copied, never touched


@pytest.mark.parametrize("tasks", [None, ("a", "b", "c")])
def test_trainable_parameter_count(tasks):
    length, m = 4, 8
    model = ph.compose(tiny.bert(), ph.AttentionMix(sources(5, length), target=ph.Prompt(length=length),
                                                    bottleneck=m, tasks=tasks))
    per_task = len(tasks or "x")
    assert model.trainable_parameters().trainable == 2 * D * m + 2 * D + length * D * per_task


def test_sources_of_another_length_raise_unless_fitted():
    src = {"short": torch.randn(2, D), "long": torch.randn(6, D), "same": torch.randn(4, D)}
    with pytest.raises(ConfigError, match="fit_sources=True"):
        ph.compose(tiny.bert(), ph.AttentionMix(src, target=ph.Prompt(length=4)))
    m = mix(ph.compose(tiny.bert(), ph.AttentionMix(src, target=ph.Prompt(length=4), fit_sources=True)))
    assert torch.equal(m.sources[0], torch.cat([src["short"], torch.zeros(2, D)]))
    assert torch.equal(m.sources[1], src["long"][:4]) and torch.equal(m.sources[2], src["same"])
    assert torch.equal(m.source_keys[0], src["short"].amax(0))  # padding is not part of the key
    assert torch.equal(m.source_keys[1], src["long"][:4].amax(0))


def test_mixed_task_batch_equals_each_example_alone():
    cfg = ph.AttentionMix(sources(2), target=ph.Prompt(length=4), tasks=["a", "b", "c"])
    model = ph.compose(tiny.bert(), cfg)
    with torch.no_grad():
        mix(model).targets.add_(torch.randn(3, 4, D))  # distinct targets per task
    inputs, names = tiny.batch("bert"), ["c", "a", "c"]
    together = run(model, inputs, task_ids=names)
    a = mix(model).last_attention()
    for i, name in enumerate(names):
        alone = {k: v[i:i + 1] for k, v in inputs.items()}
        torch.testing.assert_close(run(model, alone, task_ids=[name]), together[i:i + 1], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mix(model).last_attention(), a[i:i + 1], atol=1e-6, rtol=1e-6)
    embeds = model.base.get_input_embeddings()(inputs["input_ids"])
    ids = torch.tensor([2, 0, 2])
    want, _ = explicit(mix(model), embeds, inputs["attention_mask"], ids)
    ctx = CallContext()
    with ctx.bound(CallState(task_ids=ids)):
        torch.testing.assert_close(mix(model).prompt(embeds, inputs["attention_mask"], ctx), want)
    with pytest.raises(RoutingError, match="task_ids"):
        run(model, inputs)


@pytest.mark.parametrize("arch", ["roberta", "llama"])
def test_runs_on_every_family(arch):
    base, inputs = tiny.BUILDERS[arch](), tiny.batch(arch)
    model = ph.compose(base, ph.AttentionMix(sources(2), target=ph.Prompt(length=4)))
    out = run(model, inputs)
    assert out.shape[1] == (2 if arch == "roberta" else 4 + inputs["input_ids"].shape[1])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_only_labels_are_masked_over_the_prompt(arch):
    base, inputs = tiny.BUILDERS[arch](), tiny.batch(arch)
    model = ph.compose(base, ph.AttentionMix(sources(2), target=ph.Prompt(length=4)))
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    want = F.cross_entropy(out.logits[:, 3:-1].reshape(-1, tiny.VOCAB), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)


def test_t5_generate_injects_the_mixed_prompt_once_at_the_encoder():
    base = tiny.t5()
    model = ph.compose(base, ph.AttentionMix(sources(2), target=ph.Prompt(length=4)))
    ids = torch.randint(3, tiny.VOCAB, (2, 5))
    mask = torch.ones_like(ids)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    seq = torch.zeros(2, 1, dtype=torch.long)
    for _ in range(3):
        logits = run(model, {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": seq})
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq)


def test_gpt2_generate_mixes_once_from_the_input():
    model = ph.compose(tiny.gpt2(), ph.AttentionMix(sources(2), target=ph.Prompt(length=4)))
    ids = torch.randint(3, tiny.VOCAB, (2, 5))
    first = run(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[:, -1].argmax(-1)
    a = mix(model).last_attention()
    got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert got.shape == (2, 8) and torch.equal(got[:, :5], ids) and torch.equal(got[:, 5], first)
    assert torch.equal(mix(model).last_attention(), a)  # the weights of the input, not of a later step


class WordTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [5 + (sum(map(ord, w)) % 80) for w in text.split()]}


def test_target_initialisation():
    base = tiny.bert()
    emb = base.get_input_embeddings().weight
    src = sources(2)
    copied = mix(ph.compose(base, ph.AttentionMix(src, target=ph.Prompt(length=4), init_from="s1", tasks=["a", "b"])))
    assert torch.equal(copied.targets, src["s1"].expand(2, -1, -1))
    text = ph.AttentionMix(src, target=ph.Prompt(length=4, init="text", text="two words"))
    got = mix(ph.compose(tiny.bert(), text, tokenizer=WordTokenizer())).targets[0]
    assert torch.equal(got, emb[torch.tensor(WordTokenizer()("two words")["input_ids"] * 2)])
    vocab = mix(ph.compose(tiny.bert(), ph.AttentionMix(src, target=ph.Prompt(length=4, init="vocab")))).targets[0]
    assert all((emb == row).all(-1).any() for row in vocab)
    rand = mix(ph.compose(tiny.bert(), ph.AttentionMix(src, target=ph.Prompt(length=4)))).targets
    assert rand.abs().max() <= 0.5
    with pytest.raises(ConfigError, match="init_from"):
        ph.AttentionMix(src, init_from="nope")


def test_sources_given_as_modules_models_or_registry_refs():
    base = tiny.bert()
    trained = ph.attach(tiny.bert(), ph.Prompt(length=4))
    module = ph.attach(tiny.bert(seed=3), ph.Prompt(length=4)).adapters["default"]["prompt"]

    class Registry:  # duck-typed: load(ref, base) -> a ModularModel holding one prompt; get(ref) -> a card
        def __init__(self):
            self.asked = []

        def load(self, ref, base, heads=True):
            self.asked.append(ref)
            return trained

        def get(self, ref):
            if ref != "sst2-prompt@1":
                raise NotFoundError(ref)
            return SimpleNamespace(ref=ref, digest="ab" * 32)

    reg = Registry()
    cfg = ph.AttentionMix([module, "sst2-prompt@1", trained], target=ph.Prompt(length=4), registry=reg)
    assert cfg.sources == ("source0", "sst2-prompt@1", "source2")
    assert ph.AttentionMix({"sst2": module, "mnli": trained}).sources == ("sst2", "mnli")  # e.g. ranking.top(2)
    m = mix(ph.compose(base, cfg))
    assert reg.asked == ["sst2-prompt@1"]
    want = trained.adapters["default"]["prompt"].embeddings
    assert torch.equal(m.sources[0], module.embeddings) and torch.equal(m.sources[1], want)
    assert torch.equal(m.sources[2], want)
    assert m.parents() == [{"ref": "sst2-prompt@1", "sha256": "ab" * 32}]  # labels are not parents
    assert cfg.replace(temperature=2.0).build(base, None).sources.shape == (3, 4, D)  # values survive replace
    with pytest.raises(ConfigError, match="exactly one"):
        ph.AttentionMix([ph.attach(tiny.bert(), ph.LoRA(r=2))])
    with pytest.raises(ConfigError, match="width"):
        ph.AttentionMix([torch.zeros(20, 7)]).build(base, None)


def test_registry_refs_resolve_and_become_parents(tmp_path):
    from pelthub.registry import Registry
    reg = Registry(tmp_path / "reg")
    trained = ph.attach(tiny.bert(), ph.Prompt(length=4))
    ref = reg.add(trained, name="sst2-prompt", task="sst2")
    other = torch.randn(4, D)
    model = ph.compose(tiny.bert(), ph.AttentionMix([ref, other], target=ph.Prompt(length=4), registry=reg))
    m = mix(model)
    assert torch.equal(m.sources[0], trained.adapters["default"]["prompt"].embeddings)
    assert m.parents() == [{"ref": ref, "sha256": reg.get(ref).digest}]
    inputs = tiny.batch("bert")
    expected = run(model, inputs)
    composed = reg.add(model, name="attempt", task="rte", parents=m.parents())
    assert [p["ref"] for p in reg.get(composed).parents] == [ref]
    assert torch.equal(run(reg.load(composed, tiny.bert()), inputs), expected)


def test_config_is_json_and_validated():
    cfg = ph.AttentionMix(sources(2), target=ph.Prompt(length=4), tasks=["a", "b"], temperature=3.0, pool="mean")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["sources"] == ["s0", "s1"] and data["target"]["kind"] == "prompt"
    assert config_from_dict(data) == cfg.config and isinstance(cfg.config, AttentionMixConfig)
    for bad in [dict(pool="min"), dict(temperature=0), dict(tasks=[]), dict(bottleneck=0),
                dict(target=ph.LoRA()), dict(sources=["x", "x"]), dict(sources="x")]:
        with pytest.raises(ConfigError):
            ph.AttentionMix(**{"sources": [], **bad})


def test_save_load_stands_alone(tmp_path):
    src = sources(3)
    model = ph.compose(tiny.bert(), ph.AttentionMix(src, target=ph.Prompt(length=4), tasks=["a", "b"]))
    with torch.no_grad():
        mix(model).targets.add_(1.0)
        mix(model).router[0].weight.mul_(3.0)
    inputs, task_ids = tiny.batch("bert"), ["b", "a", "b"]
    expected = run(model, inputs, task_ids=task_ids)
    model.save_pretrained(tmp_path)
    loaded = ph.from_pretrained(tiny.bert(), tmp_path)  # no source values, no registry: all from the files
    assert torch.equal(run(loaded, inputs, task_ids=task_ids), expected)
    assert torch.equal(mix(loaded).sources, torch.stack(list(src.values())))
    assert loaded.task_names == ["a", "b"] and mix(loaded).config == mix(model).config


def test_detach_restores_the_base():
    base, inputs = tiny.bert(), tiny.batch("bert")
    before = run(base, inputs)
    model = ph.compose(base, ph.AttentionMix(sources(2), target=ph.Prompt(length=4)))
    run(model, inputs)
    assert torch.equal(run(model.detach(), inputs), before)
