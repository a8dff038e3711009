"""SPT (semi-parametric prompt tuning): k = 0 is prompt tuning, retrieval by hand, per-example batches,
frozen bank, registry parents, save/load, keys from training inputs, config checks."""
import json

import pytest
import torch
from transformers import BertTokenizer

import pelthub as ph
from pelthub.errors import ConfigError, UnsupportedModelError
from pelthub.modules.base import CallContext
from pelthub.modules.config import config_from_dict
from pelthub.registry import Registry
from pelthub.routing.spt import SPTConfig, memory_key
from pelthub.tasks import Example
from tests import tiny

D = 32  # width of the tiny models
L, ML = 4, 3  # soft prompt and memory prompt lengths


def bank(n, length=ML, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"m{i}": torch.empty(length, D).uniform_(-0.5, 0.5, generator=g) for i in range(n)}


def spt(model, name="default"):
    return model.adapters[name]["spt"]


@torch.no_grad()
def hand_queries(base, inputs):
    """q_b: mean of example b's input embeddings over its real tokens, one example at a time."""
    emb = base.get_input_embeddings()(inputs["input_ids"])
    return torch.stack([emb[b][inputs["attention_mask"][b].bool()].mean(0) for b in range(emb.shape[0])]), emb


def hand_top(q, keys, k):
    """Indices of the k largest cosines q·k_j / (|q||k_j|), best first, by sorting a Python list."""
    scores = [float(q @ key / (q.norm() * key.norm())) for key in keys]
    return sorted(range(len(keys)), key=lambda j: -scores[j])[:k]


@pytest.mark.parametrize("arch", ["bert", "t5", "gpt2"])
@pytest.mark.parametrize("init", ["random", "vocab"])
def test_top_k_zero_is_prompt_tuning(arch, init):
    inputs = tiny.batch(arch)
    if arch == "gpt2":
        inputs["labels"] = inputs["input_ids"]
    torch.manual_seed(5)
    model = ph.attach(tiny.BUILDERS[arch](), ph.SPT(bank(3), top_k=0, prompt=ph.Prompt(length=L, init=init)))
    torch.manual_seed(5)
    plain = ph.attach(tiny.BUILDERS[arch](), ph.Prompt(length=L, init=init))
    m, p = spt(model), plain.adapters["default"]["prompt"]
    assert torch.equal(m.soft, p.embeddings)
    out, ref = model(**inputs), plain(**inputs)
    assert torch.equal(out.logits, ref.logits)
    if arch == "gpt2":
        assert torch.equal(out.loss, ref.loss)
    out.logits.square().sum().backward()
    ref.logits.square().sum().backward()
    assert torch.equal(m.soft.grad, p.embeddings.grad) and m.memory.grad is None


@pytest.mark.parametrize("top_k", [1, 2])
def test_retrieval_and_input_equal_the_hand_computation(top_k):
    base, inputs = tiny.bert().eval(), tiny.batch("bert", b=4, n=7)
    inputs["attention_mask"][1, -3:] = 0
    q, emb = hand_queries(base, inputs)
    g = torch.Generator().manual_seed(2)
    keys = torch.cat([q[[2, 0, 3]] + 0.05 * torch.randn(3, D, generator=g), torch.randn(2, D, generator=g)])
    memory = bank(5)
    model = ph.attach(base, ph.SPT(memory, keys=keys, top_k=top_k, prompt=ph.Prompt(length=L))).eval()
    m = spt(model)
    expected = [hand_top(q[b], keys, top_k) for b in range(4)]
    assert len({tuple(e) for e in expected}) >= 3  # a mixed batch: examples retrieve different prompts
    chosen, scores = m.retrieve(emb, inputs["attention_mask"])
    assert chosen.tolist() == expected
    torch.testing.assert_close(scores, torch.stack([torch.stack([
        q[b] @ keys[j] / (q[b].norm() * keys[j].norm()) for j in expected[b]]) for b in range(4)]))
    values = list(memory.values())
    prefix = [torch.cat([m.soft.detach(), *[values[j] for j in expected[b]]]) for b in range(4)]
    assert torch.equal(m.prompt(emb, inputs["attention_mask"], CallContext()), torch.stack(prefix))
    embeds = torch.stack([torch.cat([prefix[b], emb[b]]) for b in range(4)])
    n = L + top_k * ML
    mask = torch.cat([torch.ones(4, n, dtype=torch.long), inputs["attention_mask"]], 1)
    with torch.no_grad():
        want = base(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(tiny.run(model, inputs), want, atol=1e-5, rtol=1e-5)


def test_without_a_mask_every_position_is_real():
    base, inputs = tiny.bert().eval(), tiny.batch("bert")
    m = spt(ph.attach(base, ph.SPT(bank(4), top_k=2, prompt=ph.Prompt(length=L))))
    emb = base.get_input_embeddings()(inputs["input_ids"])
    keys = m.keys
    assert m.retrieve(emb, None)[0].tolist() == [hand_top(emb[b].mean(0), keys, 2) for b in range(3)]


def test_default_keys_are_each_prompts_mean_token_and_keys_may_be_named():
    memory = bank(3)
    m = spt(ph.attach(tiny.bert(), ph.SPT(memory, top_k=1, prompt=ph.Prompt(length=L))))
    assert torch.equal(m.keys, torch.stack([v.mean(0) for v in memory.values()]))
    key = torch.randn(D)
    m = spt(ph.attach(tiny.bert(), ph.SPT(memory, keys={"m1": key}, top_k=1, prompt=ph.Prompt(length=L))))
    assert torch.equal(m.keys[1], key) and torch.equal(m.keys[0], memory["m0"].mean(0))


@pytest.mark.parametrize("train_bank", [False, True])
def test_bank_is_frozen_unless_asked(train_bank):
    base, inputs = tiny.bert(), tiny.batch("bert")
    model = ph.attach(base, ph.SPT(bank(5), top_k=2, prompt=ph.Prompt(length=L), train_bank=train_bank))
    m = spt(model)
    assert model.trainable_parameters().trainable == L * D + train_bank * 5 * ML * D
    model(**inputs).logits.square().sum().backward()
    assert m.soft.grad.abs().sum() > 0 and m.keys.grad is None
    if not train_bank:
        assert m.memory.grad is None
        return
    q, _ = hand_queries(base, inputs)
    used = {j for b in range(3) for j in hand_top(q[b], m.keys, 2)}
    touched = {j for j in range(5) if m.memory.grad[j].abs().sum() > 0}
    assert touched == used and len(used) < 5


def test_bank_from_registry_refs_becomes_parents_and_reloads(tmp_path):
    reg = Registry(tmp_path / "reg")
    trained = ph.attach(tiny.bert(), ph.Prompt(length=ML))
    tiny.perturb(trained, 1)
    ref = reg.add(trained, name="sst2-prompt", task="sst2")
    other = torch.randn(ML, D)
    model = ph.compose(tiny.bert(), ph.SPT([ref, other], top_k=1, prompt=ph.Prompt(length=L), registry=reg))
    m = spt(model, "composed")
    assert m.config.bank == (ref, "memory1")
    assert torch.equal(m.memory[0], trained.adapters["default"]["prompt"].embeddings)
    assert torch.equal(m.memory[1], other)
    assert m.parents() == [{"ref": ref, "sha256": reg.get(ref).digest}] and model.parents == m.parents()
    inputs = tiny.batch("bert")
    expected = tiny.run(model, inputs)
    composed = reg.add(model, name="spt", task="rte", parents=model.parents)
    assert [p["ref"] for p in reg.get(composed).parents] == [ref]
    assert torch.equal(tiny.run(reg.load(composed, tiny.bert()), inputs), expected)
    with pytest.raises(ConfigError, match="registry="):
        ph.compose(tiny.bert(), ph.SPT([ref], top_k=1))


def test_save_load_stands_alone(tmp_path):
    model = ph.attach(tiny.bert(), ph.SPT(bank(4), keys=torch.randn(4, D), top_k=2, prompt=ph.Prompt(length=L),
                                          train_bank=True))
    tiny.perturb(model, 3)
    inputs = tiny.batch("bert")
    expected = tiny.run(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = ph.from_pretrained(tiny.bert(), tmp_path)  # no bank values, no registry: all from the files
    assert torch.equal(tiny.run(loaded, inputs), expected)
    assert spt(loaded).config == spt(model).config and spt(loaded).config.memory_length == ML
    assert spt(loaded).memory.requires_grad and not spt(loaded).keys.requires_grad


def test_memory_key_is_the_mean_query_over_the_training_inputs():
    words = ["cat", "dog", "tree", "leaf", "gear", "bolt"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])})
    data = [Example(t, 0) for t in ["cat dog tree", "leaf", "gear bolt bolt gear cat"]]
    base = tiny.bert()
    embed = base.get_input_embeddings()
    with torch.no_grad():  # each example alone, no padding at all
        want = torch.stack([embed(tok(e.text, return_tensors="pt")["input_ids"])[0].mean(0) for e in data]).mean(0)
    torch.testing.assert_close(memory_key(base, data, tok, batch_size=2), want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ConfigError, match="at least one"):
        memory_key(base, [], tok)


def test_config_is_json_and_validated():
    cfg = ph.SPT(bank(3), top_k=2, prompt=ph.Prompt(length=L))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["bank"] == ["m0", "m1", "m2"] and data["prompt"]["kind"] == "prompt"
    assert config_from_dict(data) == cfg.config and isinstance(cfg.config, SPTConfig)
    for bad in [dict(top_k=4), dict(top_k=-1), dict(top_k=True), dict(prompt=ph.LoRA()), dict(bank=["x", "x"]),
                dict(train_bank=1), dict(memory_length=3, bank=[])]:
        with pytest.raises(ConfigError):
            ph.SPT(**{"bank": bank(3), **bad})
    base = tiny.bert()
    for bad, match in [(dict(bank={"a": torch.zeros(3, D), "b": torch.zeros(2, D)}), "share one length"),
                       (dict(bank=[torch.zeros(3, 7)]), "width"),
                       (dict(bank=bank(2), keys=torch.zeros(2, 5)), r"\(32,\) vectors"),
                       (dict(bank=["ref@1"]), "registry=")]:
        with pytest.raises(ConfigError, match=match):
            ph.attach(base, ph.SPT(**bad))
    for keys, match in [(torch.zeros(3, D), "one row per bank prompt"), ({"zz": torch.zeros(D)}, "mapping")]:
        with pytest.raises(ConfigError, match=match):
            ph.SPT(bank(2), keys=keys)


def test_detach_restores_the_base():
    base, inputs = tiny.bert(), tiny.batch("bert")
    before = tiny.run(base, inputs)
    model = ph.attach(base, ph.SPT(bank(2), top_k=1, prompt=ph.Prompt(length=L)))
    tiny.run(model, inputs)
    assert torch.equal(tiny.run(model.detach(), inputs), before)


def test_models_without_token_embeddings_are_refused():
    from tests import tiny_more
    with pytest.raises(UnsupportedModelError, match="token embeddings"):
        ph.attach(tiny_more.family("vit"), ph.SPT(bank(2), top_k=1, prompt=ph.Prompt(length=L)))
