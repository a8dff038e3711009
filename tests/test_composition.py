"""Composition: blocks as data, exact mixtures, stacks, merging, weight search, composite saves."""
import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import pelthub as ph
from pelthub.composition import block_from_dict, parents
from pelthub.composition.merge import ties
from pelthub.modules.base import site_name
from pelthub.errors import ConfigError, IncompatibleModuleError, ModuleFormatError
from tests import tiny
from tests.hub_fixtures import local_hub  # noqa: F401  (pytest fixture)

TARGETS = ("q", "v", "down")


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def trained(config, base=None, seed=0, scale=0.3):
    """A ModularModel with one module whose tensors moved away from their initialisation."""
    model = ph.attach(base or tiny.bert(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.module_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def module(model, kind):
    return model.adapters["default"][kind]


def deltas(lora_module):
    return {k: layer.delta_weight() for k, layer in lora_module.layers.items()}


def has_no_hooks(base):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in base.modules())


def test_blocks_round_trip_as_data(tmp_path):
    blocks = [ph.Stack(str(tmp_path / "a"), "sst2-adapter@2", ph.Bottleneck(reduction=4)),
              ph.WeightedSum(["x@1", "y"], [0.25, -1]), ph.Average("x", str(tmp_path / "b"))]
    for block in blocks:
        assert block_from_dict(json.loads(json.dumps(block.to_dict()))) == block
    assert ph.WeightedSum(["x", "y"], [1, 2]).weights == (1.0, 2.0)
    assert ph.Average("x", "y", "z").weights == (1 / 3,) * 3
    with pytest.raises(ConfigError, match="cannot be written as data"):
        ph.Stack(trained(ph.LoRA(r=2))).to_dict()
    with pytest.raises(ConfigError, match="one weight per source|2 numbers"):
        ph.WeightedSum(["x", "y"], [1.0])
    with pytest.raises(ConfigError, match="one or more modules"):
        ph.Average()
    with pytest.raises(ConfigError, match="not a composition block"):
        block_from_dict({"block": "blend"})


def test_weighted_sum_of_loras_is_the_exact_sum_of_deltas():
    loras = [trained(ph.LoRA(r=r, alpha=a, targets=TARGETS), seed=s) for s, (r, a) in enumerate([(2, 4.0), (3, 1.0)])]
    weights = (0.7, -1.3)
    base, inputs = tiny.bert(), tiny.batch("bert")
    model = ph.compose(base, ph.WeightedSum(loras, weights))
    got = deltas(model.adapters["composed"]["lora"])
    for key, delta in got.items():
        expected = sum(w * deltas(module(m, "lora"))[key] for w, m in zip(weights, loras))
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)
    reference = ph.ModularModel(tiny.bert())  # every delta added by its own hook: Σ wᵢ ΔWᵢ x
    for i, (w, m) in enumerate(zip(weights, loras)):
        source = module(m, "lora")
        lora = reference.add(f"s{i}", [source.config]).adapters[f"s{i}"]["lora"]
        lora.load_state_dict(source.state_dict())
        with torch.no_grad():
            for layer in lora.layers.values():
                layer.lora_b.mul_(w)
    torch.testing.assert_close(run(model, inputs), run(reference, inputs), atol=1e-5, rtol=1e-5)
    assert model.trainable_parameters().trainable == 0  # reused modules are frozen


def test_average_of_prompts_is_the_mean_prompt():
    prompts = [trained(ph.Prompt(length=4), seed=s) for s in range(3)]
    model = ph.compose(tiny.bert(), ph.Average(*prompts))
    expected = torch.stack([module(p, "prompt").embeddings for p in prompts]).mean(0)
    torch.testing.assert_close(model.adapters["composed"]["prompt"].embeddings, expected)


def test_mixtures_reject_other_kinds_and_roll_back():
    base = tiny.bert()
    with pytest.raises(ConfigError, match="LoRA or prompt"):
        ph.compose(base, ph.WeightedSum([trained(ph.LoRA(r=2)), trained(ph.Prompt(length=2))], [1, 1]))
    with pytest.raises(IncompatibleModuleError, match="different shapes"):
        ph.compose(base, ph.Average(trained(ph.Prompt(length=2)), trained(ph.Prompt(length=3))))
    assert has_no_hooks(base) and all(p.requires_grad for p in base.parameters())


def test_stack_applies_adapters_in_sequence_and_trains_only_new_configs():
    a1, a2 = (trained(ph.Bottleneck(reduction=4), seed=s) for s in (1, 2))
    inputs = tiny.batch("bert")
    model = ph.compose(tiny.bert(), ph.Stack(a1, a2, ph.LoRA(r=2)))
    assert list(model.adapters) == ["composed", "composed-1", "composed-2"]
    manual = tiny.bert()
    for i, layer in enumerate(manual.bert.encoder.layer):  # h ← h + a(h), a1 first
        for m in (a1, a2):
            adapter = module(m, "bottleneck").layers[f"bert-encoder-layer-{i}-output-dense"]
            layer.output.dense.register_forward_hook(lambda _m, _a, out, a=adapter: out + a(out))
    torch.testing.assert_close(run(model, inputs), run(manual, inputs), atol=1e-6, rtol=1e-6)
    swapped = ph.compose(tiny.bert(), ph.Stack(a2, a1))
    assert not torch.allclose(run(swapped, inputs), run(model, inputs), atol=1e-4)
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"composed-2"}


def test_compose_keeps_attaching_configs_in_one_set():
    model = ph.compose(tiny.bert(), ph.LoRA(r=2), ph.Prompt(length=2), name="mine")
    assert list(model.adapters) == ["mine"] and set(model.adapters["mine"]) == {"lora", "prompt"}
    assert model.parents == []


def test_sources_from_directories_and_the_registry_with_parents(tmp_path):
    lora = trained(ph.LoRA(r=2, targets=TARGETS), seed=3)
    prompt = trained(ph.Prompt(length=3), seed=4)
    lora.save_pretrained(tmp_path / "lora")
    registry = ph.Registry()
    ref = registry.add(prompt, name="some-prompt", task="t")
    inputs = tiny.batch("bert")
    model = ph.compose(tiny.bert(), ph.Stack(str(tmp_path / "lora"), ref), registry=registry)
    card = registry.get(ref)
    assert model.parents == [{"ref": card.ref, "sha256": card.digest}] == parents(ph.Stack(ref), registry=registry)
    reference = ph.attach(tiny.bert(), ph.LoRA(r=2, targets=TARGETS), name="a")
    reference.adapters["a"]["lora"].load_state_dict(module(lora, "lora").state_dict())
    ph.attach(reference, ph.Prompt(length=3), name="b").adapters["b"]["prompt"].load_state_dict(
        module(prompt, "prompt").state_dict())
    torch.testing.assert_close(run(model, inputs), run(reference, inputs))
    model.save_pretrained(tmp_path / "composite", parents=model.parents)
    child = registry.add(tmp_path / "composite", name="composite")
    assert registry.get(child).parents == model.parents
    assert (card.ref, child) in registry.graph().edges


def test_incompatible_sources_are_refused():
    with pytest.raises(IncompatibleModuleError, match="another architecture"):
        ph.compose(tiny.bert(), ph.Stack(trained(ph.LoRA(r=2), base=tiny.gpt2())))
    wide = BertForSequenceClassification(BertConfig(vocab_size=tiny.VOCAB, hidden_size=48, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64))
    base = tiny.bert()
    with pytest.raises(IncompatibleModuleError, match="does not fit"):  # a bare module: its tensors are checked
        ph.compose(base, module(trained(ph.LoRA(r=2), base=wide), "lora"))
    assert has_no_hooks(base)


# ----- merge -----

def loras(*ranks, targets=TARGETS):
    return [trained(ph.LoRA(r=r, alpha=2.0 * (i + 1), targets=targets), seed=i) for i, r in enumerate(ranks)]


def weighted_delta(models, weights):
    per = [deltas(module(m, "lora")) for m in models]
    return {k: sum(w * d[k] for w, d in zip(weights, per)) for k in per[0]}


def test_merge_cat_is_exact_and_svd_is_exact_at_full_rank():
    models, weights = loras(2, 3, 2), [0.5, -0.25, 1.5]
    expected = weighted_delta(models, weights)
    cat = ph.merge(models, weights, method="cat")
    assert cat.config.r == 7 and cat.config.alpha == 7.0
    svd = ph.merge(models, weights, method="svd", rank=7)
    for merged in (cat, svd):
        for key, delta in deltas(merged).items():
            torch.testing.assert_close(delta, expected[key], atol=1e-5, rtol=1e-4)
    small = ph.merge(models, weights, method="svd", rank=2)
    for key, delta in deltas(small).items():  # the best rank-2 approximation
        u, s, vh = torch.linalg.svd(expected[key])
        torch.testing.assert_close(delta, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=1e-4)


def test_merge_linear_mixes_factors():
    models, weights = loras(2, 2), [0.6, 0.4]
    merged = ph.merge(models, weights, method="linear")
    for key, layer in merged.layers.items():
        src = [module(m, "lora").layers[key] for m in models]
        torch.testing.assert_close(layer.lora_a, sum(w * s.lora_a for w, s in zip(weights, src)))
        torch.testing.assert_close(layer.lora_b, sum(w * s.lora_b * s.scale for w, s in zip(weights, src)))
    single = ph.merge(models[:1], [1.0], method="linear")
    for key, delta in deltas(single).items():
        torch.testing.assert_close(delta, deltas(module(models[0], "lora"))[key])


def test_ties_trims_elects_sign_and_takes_the_disjoint_mean():
    d = torch.tensor([[[3.0, -1.0, 0.1, 2.0]], [[-1.0, -4.0, 0.2, 1.0]]])
    merged = ties(d, torch.tensor([1.0, 1.0]), density=0.5)  # keep 2 of 4 entries each
    # kept: [3, 0, 0, 2] and [0, -4, 0, 1]; signs +, -, 0, +; means 3, -4, 0, 1.5
    torch.testing.assert_close(merged, torch.tensor([[3.0, -4.0, 0.0, 1.5]]))
    models = loras(2, 2)
    merged = ph.merge(models, [1.0, 1.0], method="ties", density=1.0, rank=32)  # full rank: exact
    expected = {k: ties(torch.stack([deltas(module(m, "lora"))[k] for m in models]), torch.ones(2), 1.0)
                for k in merged.layers}
    for key, delta in deltas(merged).items():
        torch.testing.assert_close(delta, expected[key], atol=1e-5, rtol=1e-4)


def test_merge_errors():
    with pytest.raises(IncompatibleModuleError, match="other sites"):
        ph.merge(loras(2) + loras(2, targets=("q",)), method="cat")
    with pytest.raises(ConfigError, match="equal ranks"):
        ph.merge(loras(2, 3), method="linear")
    with pytest.raises(ConfigError, match="one weight per module"):
        ph.merge(loras(2, 2), [1.0])
    with pytest.raises(ConfigError, match="LoRA modules only"):
        ph.merge([trained(ph.Prompt(length=2))])
    with pytest.raises(ConfigError, match="must be one of"):
        ph.merge(loras(2), method="mean")
    with pytest.raises(IncompatibleModuleError, match="different architectures"):
        ph.merge([trained(ph.LoRA(r=2), base=tiny.bert()), trained(ph.LoRA(r=2), base=tiny.roberta())])


def test_merged_module_attaches_saves_and_loads(tmp_path):
    merged = ph.merge(loras(2, 3), [1.0, 0.5], method="cat")
    inputs = tiny.batch("bert")
    model = ph.compose(tiny.bert(), merged)
    expected = run(model, inputs)
    model.save_pretrained(tmp_path)
    assert torch.equal(run(ph.from_pretrained(tiny.bert(), tmp_path), inputs), expected)


# ----- weight search -----

def test_search_weights_finds_a_lower_loss_within_bounds():
    models = loras(2, 2, 2)
    teacher = models[1]
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, tiny.VOCAB, (8, 8), generator=g)
    examples = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": run(teacher, {"input_ids": ids}).argmax(-1)}
    base = tiny.bert()
    with torch.no_grad():
        start = base(**examples).loss.item()
    model, weights = ph.search_weights(base, models, examples, steps=8, l1=0.01, method="cat")
    assert len(weights) == 3 and all(-1.5 <= w <= 1.5 for w in weights)
    with torch.no_grad():
        found = model(**examples).loss.item()
    assert found + 0.01 * sum(map(abs, weights)) < start
    for key, delta in deltas(model.adapters["lorahub"]["lora"]).items():
        torch.testing.assert_close(delta, weighted_delta(models, weights)[key], atol=1e-5, rtol=1e-4)


def test_search_weights_takes_a_loss_function_and_checks_its_inputs():
    models = loras(2, 2)
    ids = torch.randint(3, tiny.VOCAB, (4, 6))
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        return model(**batch).logits[:, 0].mean()

    _, weights = ph.search_weights(tiny.bert(), models, [{"input_ids": ids}], loss_fn=loss_fn, steps=6)
    assert len(calls) == 6 and len(weights) == 2  # steps = loss evaluations
    with pytest.raises(ConfigError, match="labels"):
        ph.search_weights(tiny.bert(), models, {"input_ids": ids}, steps=2)
    with pytest.raises(ConfigError, match="bounds"):
        ph.search_weights(tiny.bert(), models, {"input_ids": ids}, bounds=(1.0, -1.0))


# ------------------------------------------------------------------ composition as data
def edited_base(deltas_and_weights):
    """A fresh tiny BERT with Σ wᵢ ΔWᵢ added into its weights by hand: the reference for sums of LoRAs."""
    base = tiny.bert()
    with torch.no_grad():
        for weight, lora in deltas_and_weights:
            for key, layer in lora.layers.items():
                base.get_submodule(site_name(key)).weight.add_(weight * layer.delta_weight())
    return base


def test_nested_blocks_compute_the_math_and_save_as_blocks(tmp_path):
    a, b, c = (trained(ph.LoRA(r=r, alpha=al, targets=TARGETS), seed=s) for s, (r, al) in enumerate([(2, 4.0), (3, 1.0), (2, 2.0)]))
    for name, m in zip("abc", (a, b, c)):
        m.save_pretrained(tmp_path / name)
    inputs = tiny.batch("bert")
    inner = ph.Average(str(tmp_path / "a"), str(tmp_path / "b"))
    block = ph.Stack(ph.Average(inner, str(tmp_path / "c")), ph.IA3())
    model = ph.compose(tiny.bert(), block)
    # Average(Average(a, b), c) = ¼ΔW_a + ¼ΔW_b + ½ΔW_c, and a fresh IA3 scales by 1
    reference = edited_base([(0.25, module(a, "lora")), (0.25, module(b, "lora")), (0.5, module(c, "lora"))])
    torch.testing.assert_close(run(model, inputs), run(reference, inputs), atol=1e-5, rtol=1e-5)
    assert model.composition == [{**block.to_dict(), "sets": ["composed", "composed-1"]}]
    assert [m.config.kind for s in model.adapters.values() for m in s.values()] == ["lora", "ia3"]

    model.save_pretrained(tmp_path / "composite")
    saved = json.loads((tmp_path / "composite" / "pelthub.json").read_text())
    assert saved["composition"][0]["block"] == "stack"
    assert saved["composition"][0]["sources"][0] == {"block": "average", "sources": [inner.to_dict(), str(tmp_path / "c")]}
    loaded = ph.from_pretrained(tiny.bert(), tmp_path / "composite")
    assert torch.equal(run(loaded, inputs), run(model, inputs))
    assert loaded.composition == model.composition
    assert block_from_dict(loaded.composition[0]) == block  # the structure itself comes back
    loaded.remove("composed-1")
    assert loaded.composition == []  # a block whose sets were removed is no longer part of the model


def test_a_stack_of_several_modules_cannot_be_summed():
    lora = trained(ph.LoRA(r=2, targets=TARGETS))
    with pytest.raises(ConfigError, match="inside a sum is more than one module"):
        ph.compose(tiny.bert(), ph.Average(ph.Stack(lora, lora), lora))


def test_in_memory_sources_are_recorded_but_not_rebuilt(tmp_path):
    lora = trained(ph.LoRA(r=2, targets=TARGETS))
    model = ph.compose(tiny.bert(), ph.Average(lora, lora))
    assert model.composition[0]["sources"] == [{"in_memory": "ModularModel"}] * 2
    with pytest.raises(ConfigError, match="in-memory ModularModel"):
        block_from_dict(model.composition[0])
    model.save_pretrained(tmp_path / "m")
    data = json.loads((tmp_path / "m" / "pelthub.json").read_text())
    data["composition"][0]["sets"] = ["not-there"]
    (tmp_path / "m" / "pelthub.json").write_text(json.dumps(data))
    with pytest.raises(ModuleFormatError, match="not-there"):
        ph.from_pretrained(tiny.bert(), tmp_path / "m")


def test_nested_composition_travels_through_the_hub_with_its_parents(tmp_path, local_hub):  # noqa: F811
    alice, bob = ph.Registry(tmp_path / "alice"), ph.Registry(tmp_path / "bob")
    a, b = (trained(ph.LoRA(r=2, targets=TARGETS), seed=s) for s in (1, 2))
    refs = [alice.add(m, name=n) for n, m in (("lora-a", a), ("lora-b", b))]
    block = ph.Stack(ph.Average(*refs), ph.IA3())
    model = ph.compose(tiny.bert(), block, registry=alice)
    model.save_pretrained(tmp_path / "composite")
    top = alice.add(tmp_path / "composite", name="composite")
    for ref, repo in zip([*refs, top], ["alice/a", "alice/b", "alice/composite"]):
        alice.push(ref, repo, endpoint=local_hub.endpoint)
    pulled = bob.pull("alice/composite", endpoint=local_hub.endpoint)
    assert {p["ref"] for p in bob.get(pulled).parents} == {bob.get(r).ref for r in ("lora-a", "lora-b")}
    loaded = bob.load(pulled, tiny.bert())
    inputs = tiny.batch("bert")
    torch.testing.assert_close(run(loaded, inputs), run(edited_base([(0.5, module(a, "lora")), (0.5, module(b, "lora"))]),
                                                        inputs), atol=1e-5, rtol=1e-5)
    assert block_from_dict(loaded.composition[0]) == block


def test_sources_are_taken_without_their_heads(tmp_path):
    """A source trained with a head for another label count still composes: reused modules never bring heads."""
    source = ph.attach(tiny.bert(num_labels=4), ph.LoRA(r=2, targets=TARGETS), head=True)
    with torch.no_grad():
        for _, p in source.module_parameters():
            p.add_(torch.randn(p.shape) * 0.3)
    assert source.heads
    registry = ph.Registry(tmp_path / "reg")
    ref = registry.add(source, name="four-labels")
    source.save_pretrained(tmp_path / "dir")
    for part in (ref, str(tmp_path / "dir")):
        model = ph.compose(tiny.bert(num_labels=2), ph.Average(ph.Stack(part)), registry=registry)
        reference = edited_base([(1.0, module(source, "lora"))])
        torch.testing.assert_close(run(model, tiny.batch("bert")), run(reference, tiny.batch("bert")),
                                   atol=1e-5, rtol=1e-5)
    arrow = ph.compose(tiny.bert(num_labels=2), ph.Arrow([ref], top_k=1), registry=registry)
    assert not arrow.heads
