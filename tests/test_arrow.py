"""Arrow routing over trained LoRAs, its registry signatures and search by example.

References are written here from the definition (ΔW_e = s_e·B_e·A_e, exact float64 SVD of the
full ΔW, dense over all sources) or are PEFT's `create_arrow_model` on the same weights.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

import pelthub as ph
from pelthub.errors import ConfigError, IncompatibleModuleError
from pelthub.registry import signatures
from pelthub.routing import arrow as arrow_impl
from tests import tiny

TARGETS = {"bert": [(4, ("q", "v")), (2, ("q", "k", "o")), (3, ("v", "up"))],
           "gpt2": [(4, ("qkv",)), (2, ("qkv", "up")), (3, ("down",))]}


def trained_loras(arch: str = "bert", specs=None, seed: int = 0, scale: float = 0.3) -> list[ph.ModularModel]:
    """LoRAs of the given (rank, targets) with every tensor moved off its init, each on its own base copy."""
    out = []
    for i, (r, targets) in enumerate(specs or TARGETS[arch]):
        model = ph.attach(tiny.BUILDERS[arch](), ph.LoRA(r=r, alpha=2.0 * r + i, targets=targets))
        tiny.perturb(model, seed=seed + i, scale=scale)
        out.append(model)
    return out


def lora_of(model: ph.ModularModel) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{site: (A, B, scale)} read straight off a pelthub LoRA's tensors."""
    (module,) = [m for s in model.adapters.values() for m in s.values()]
    return {k.replace("-", "."): (l.lora_a.detach().double(), l.lora_b.detach().double(), l.scale)
            for k, l in module.layers.items()}


def hook_reference(base, sources, top_k: int, temperature: float, general=()):
    """Arrow from its definition, dense, as plain forward hooks on `base`; returns the handles."""
    loras = [lora_of(s) for s in sources]
    gen = [lora_of(g) for g in general]
    handles = []
    for site in dict.fromkeys(s for lora in loras for s in lora):
        deltas = []
        for lora in (l for l in loras if site in l):
            a, b, scale = lora[site]
            if gen:
                a = a - torch.stack([g[site][0] for g in gen]).mean(0)
                b = b - torch.stack([g[site][1] for g in gen]).mean(0)
            deltas.append(scale * b @ a)
        dw = torch.stack(deltas)                                            # (E, out, in)
        protos = torch.stack([torch.linalg.svd(d).Vh[0] for d in dw])        # (E, in)

        def hook(_m, args, out, dw=dw, protos=protos):
            h = args[0].double()
            top, idx = (h @ protos.T).abs().topk(min(top_k, len(dw)), dim=-1)
            w = torch.softmax(top / temperature, dim=-1)
            y = torch.einsum("...i,eoi->...eo", h, dw)                      # every source, every token
            chosen = torch.gather(y, -2, idx[..., None].expand(*idx.shape, y.shape[-1]))
            return out + (w[..., None] * chosen).sum(-2).to(out.dtype)
        handles.append(base.get_submodule(site).register_forward_hook(hook))
    return handles


def reference_logits(arch, sources, top_k, temperature, inputs, general=()):
    base = tiny.BUILDERS[arch]()
    hook_reference(base, sources, top_k, temperature, general)
    return tiny.run(base, inputs)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_arrow_equals_the_definition_with_mixed_ranks_and_sites(arch):
    sources, inputs = trained_loras(arch), tiny.batch(arch)
    model = ph.compose(tiny.BUILDERS[arch](), ph.Arrow(sources, top_k=2, temperature=0.7))
    expected = reference_logits(arch, sources, 2, 0.7, inputs)
    torch.testing.assert_close(tiny.run(model, inputs), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, tiny.run(tiny.BUILDERS[arch](), inputs), atol=1e-3)  # Arrow does something


def test_general_knowledge_subtraction_equals_the_definition():
    specs = [(4, ("q", "v"))] * 3
    sources, general = trained_loras(specs=specs), trained_loras(specs=specs[:2], seed=10)
    model = ph.compose(tiny.bert(), ph.Arrow(sources, top_k=2, gks=general))
    torch.testing.assert_close(tiny.run(model, tiny.batch("bert")),
                               reference_logits("bert", sources, 2, 1.0, tiny.batch("bert"), general),
                               atol=1e-5, rtol=1e-5)


def test_general_loras_must_match_the_sources_ranks():
    general = trained_loras(specs=[(2, ("q", "v"))], seed=10)
    with pytest.raises(ConfigError, match="every general LoRA must adapt .* with the rank of source"):
        ph.compose(tiny.bert(), ph.Arrow(trained_loras(specs=[(4, ("q", "v"))]), gks=general))


def clear_loras(n: int, r: int = 4, seed: int = 0, sigma=(3.0, 0.3, 0.2, 0.1)) -> list[ph.ModularModel]:
    """LoRAs whose ΔW have a well separated top singular value, so power iteration converges."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        model = ph.attach(tiny.bert(), ph.LoRA(r=r, alpha=8.0, targets=("q", "v")))
        with torch.no_grad():
            for layer in model.adapters["default"]["lora"].layers.values():
                qa = torch.linalg.qr(torch.randn(layer.lora_a.shape[1], r, generator=g))[0]
                qb = torch.linalg.qr(torch.randn(layer.lora_b.shape[0], r, generator=g))[0]
                layer.lora_a.copy_(torch.tensor(sigma[:r])[:, None] * qa.T)
                layer.lora_b.copy_(qb)
        out.append(model)
    return out


def peft_dir(model: ph.ModularModel, path) -> str:
    """The same LoRA written by PEFT itself (weights copied into a PEFT model)."""
    from peft import LoraConfig, get_peft_model
    (module,) = model.adapters["default"].values()
    layer0 = next(iter(module.layers.values()))
    r = layer0.lora_a.shape[0]
    peft_model = get_peft_model(tiny.bert(), LoraConfig(r=r, lora_alpha=layer0.scale * r,
                                                        target_modules=["query", "value"]))
    with torch.no_grad():
        for key, layer in module.layers.items():
            target = peft_model.base_model.model.get_submodule(key.replace("-", "."))
            target.lora_A["default"].weight.copy_(layer.lora_a)
            target.lora_B["default"].weight.copy_(layer.lora_b)
    peft_model.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("gks", [False, True])
def test_arrow_equals_peft_create_arrow_model(tmp_path, gks):
    from peft import ArrowConfig, create_arrow_model
    sources, general = clear_loras(4), clear_loras(1, seed=5, sigma=(0.05, 0.04, 0.03, 0.02)) if gks else []
    paths = [peft_dir(s, tmp_path / f"task{i}") for i, s in enumerate(sources)]
    gpaths = [peft_dir(g, tmp_path / f"general{i}") for i, g in enumerate(general)] or None
    peft_model = create_arrow_model(tiny.bert(), paths, ArrowConfig(top_k=2, router_temperature=0.5, use_gks=gks,
                                                                    rng_seed=0), general_adapter_paths=gpaths)
    ours = ph.compose(tiny.bert(), ph.Arrow(sources, top_k=2, temperature=0.5, gks=general or None))
    torch.testing.assert_close(tiny.run(ours, tiny.batch("bert")), tiny.run(peft_model, tiny.batch("bert")),
                               atol=1e-5, rtol=1e-5)


def test_top_k_all_with_temperature_to_zero_is_the_best_source():
    sources, inputs = trained_loras(), tiny.batch("bert")
    model = ph.compose(tiny.bert(), ph.Arrow(sources, top_k=len(sources), temperature=1e-6))
    torch.testing.assert_close(tiny.run(model, inputs), reference_logits("bert", sources, 1, 1.0, inputs),
                               atol=1e-5, rtol=1e-5)


def test_one_source_equals_that_lora():
    (source,) = trained_loras(specs=[(4, ("q", "v", "up"))])
    model = ph.compose(tiny.bert(), ph.Arrow([source]))
    torch.testing.assert_close(tiny.run(model, tiny.batch("bert")), tiny.run(source, tiny.batch("bert")),
                               atol=1e-6, rtol=1e-6)


def test_padding_does_not_change_the_real_tokens():
    model = ph.compose(tiny.bert(), ph.Arrow(trained_loras(), top_k=2))
    inputs = tiny.batch("bert")
    alone = {"input_ids": inputs["input_ids"][-1:, :-2], "attention_mask": inputs["attention_mask"][-1:, :-2]}
    torch.testing.assert_close(tiny.run(model, inputs)[-1:], tiny.run(model, alone), atol=1e-5, rtol=1e-5)


def dense_update(h, chosen, weights, a, b):
    """Σ_j w_tj·(s·B_e)(A_e h_t) by gathering each choice's full matrices (float64)."""
    h, a, b, weights = h.double(), a.double(), b.double(), weights.double()
    per_choice = torch.einsum("ti,tjri,tjro->tjo", h, a[chosen], b[chosen])     # (t, k, out)
    return (weights[..., None] * per_choice).sum(1)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sparse_update_and_its_gradients_equal_the_dense_mixture(dtype, tol):
    """The kernel, values and gradients (to the tokens and the mixing weights), against a dense gather."""
    g = torch.Generator().manual_seed(0)
    t, e, r, d_in, d_out, k = 13, 40, 4, 24, 16, 3
    a, b = torch.randn(e, r, d_in, generator=g), torch.randn(e, r, d_out, generator=g)
    chosen = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    h = torch.randn(t, d_in, generator=g).to(dtype).requires_grad_()
    logits = torch.randn(t, k, generator=g).requires_grad_()
    got = arrow_impl.sparse_update(h, chosen, logits.softmax(1).to(dtype), a.to(dtype), b.to(dtype))
    assert got.dtype == dtype
    upstream = torch.randn(t, d_out, generator=g)
    (got.float() * upstream).sum().backward()
    h_ref, logits_ref = h.detach().double().requires_grad_(), logits.detach().double().requires_grad_()
    expected = dense_update(h_ref, chosen, logits_ref.softmax(1), a.to(dtype), b.to(dtype))
    (expected * upstream.double()).sum().backward()
    scale = expected.abs().max()
    torch.testing.assert_close(got.double() / scale, expected / scale, rtol=0, atol=tol)
    torch.testing.assert_close(h.grad.double(), h_ref.grad, rtol=tol, atol=tol * float(h_ref.grad.abs().max()))
    torch.testing.assert_close(logits.grad.double(), logits_ref.grad, rtol=tol,
                               atol=tol * float(logits_ref.grad.abs().max()))


@pytest.mark.slow
def test_compiled_arrow_equals_eager():
    torch._dynamo.reset()
    model = ph.compose(tiny.bert(), ph.Arrow(trained_loras(), top_k=2)).eval()
    inputs = tiny.batch("bert")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="eager")(**inputs).logits, tiny.run(model, inputs),
                                   rtol=1e-5, atol=1e-5)


def test_unchosen_sources_are_never_computed():
    """NaN in the sources no token picks at a layer must not reach the output (a dense mixture spreads it)."""
    specs = [(r, ("q", "v")) for r in (1, 2, 3, 4, 2, 3)]
    model = ph.compose(tiny.bert(), ph.Arrow(trained_loras(specs=specs), top_k=1))
    module, inputs = ph.routing.arrow_module(model), tiny.batch("bert", b=1, n=3)
    expected = tiny.run(model, inputs)
    seen: dict[str, torch.Tensor] = {}
    handles = [model.base.get_submodule(site).register_forward_hook(
        lambda _m, args, _o, site=site: seen.__setitem__(site, args[0].reshape(-1, args[0].shape[-1])))
        for site, _ in module.config.layout]
    tiny.run(model, inputs)
    for h in handles:
        h.remove()
    poisoned = 0
    with torch.no_grad():
        for site, entries in module.config.layout:
            _, chosen, _ = module.routing(site, seen[site])
            for j in set(range(len(entries))) - set(chosen.reshape(-1).tolist()):
                module.layers[site.replace(".", "-")].lora_b[j] = float("nan")
                poisoned += 1
    assert poisoned
    torch.testing.assert_close(tiny.run(model, inputs), expected)


def test_sources_get_no_gradients_and_the_temperature_can_train():
    model = ph.compose(tiny.bert(), ph.Arrow(trained_loras(), top_k=2, learn_temperature=True)).train()
    model(**tiny.batch("bert")).logits.square().sum().backward()
    module = ph.routing.arrow_module(model)
    assert module.log_temperature.grad is not None and module.log_temperature.grad.abs() > 0
    frozen = [(n, p) for n, p in module.named_parameters() if n != "log_temperature"]
    assert frozen and all(not p.requires_grad and p.grad is None for _, p in frozen)
    assert model.trainable_parameters().trainable == 1


def test_incompatible_sources_are_refused_naming_the_source():
    torch.manual_seed(0)
    other = BertForSequenceClassification(BertConfig(vocab_size=tiny.VOCAB, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64)).eval()
    stranger = ph.attach(other, ph.LoRA(r=2))
    with pytest.raises(IncompatibleModuleError, match="Arrow source 'source1'"):
        ph.compose(tiny.bert(), ph.Arrow([trained_loras()[0], stranger]))
    with pytest.raises(IncompatibleModuleError, match=r"Arrow source 'odd' adapts .*\(48 → 48\)"):
        ph.compose(tiny.bert(), ph.Arrow({"odd": stranger.adapters["default"]["lora"]}))
    with pytest.raises(ConfigError, match="Arrow routes over LoRAs"):
        ph.compose(tiny.bert(), ph.Arrow([ph.attach(tiny.bert(), ph.IA3())]))


def test_config_is_data_and_a_saved_arrow_model_loads_stand_alone(tmp_path):
    sources = trained_loras()
    config = ph.Arrow({"a": sources[0], "b": sources[1], "c": sources[2]}, top_k=2)
    assert config.to_dict()["sources"] == ["a", "b", "c"]
    model = ph.compose(tiny.bert(), config)
    saved = model.adapters["composed"]["arrow"].config.to_dict()
    json.dumps(saved)
    assert all(not isinstance(v, torch.Tensor) for v in saved.values()) and saved["layout"]
    model.save_pretrained(str(tmp_path))
    loaded = ph.from_pretrained(tiny.bert(), str(tmp_path))
    torch.testing.assert_close(tiny.run(loaded, tiny.batch("bert")), tiny.run(model, tiny.batch("bert")))


def test_generate_on_gpt2_matches_the_definition():
    sources = trained_loras("gpt2", scale=0.5)
    ids = torch.tensor([[5, 9, 13, 2], [7, 7, 30, 41]])
    model = ph.compose(tiny.gpt2(), ph.Arrow(sources, top_k=2))
    base = tiny.gpt2()
    hook_reference(base, sources, 2, 1.0)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = base.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(model.generate(ids, **kwargs), expected)


# ----- registry: signatures and search by example -----

WORDS = "good great bad awful movie film plot actor score goal team match win lose market stock price bank".split()


@pytest.fixture(scope="module")
def tokenizer() -> BertTokenizer:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def test_signatures_are_stored_at_add_and_arrow_over_refs_needs_no_svd(tmp_path, monkeypatch):
    registry = ph.Registry(tmp_path / "reg")
    sources = trained_loras()
    refs = [registry.add(s, name=f"lora{i}") for i, s in enumerate(sources)]
    registry.add(ph.attach(tiny.bert(), ph.IA3()), name="ia3")
    for ref, source in zip(refs, sources):
        sig = signatures.stored(registry, ref)
        for site, (a, b, scale) in lora_of(source).items():
            v = torch.linalg.svd(scale * b @ a).Vh[0]
            assert abs(float(sig[site].double() @ v)) == pytest.approx(1.0, abs=1e-5)
    in_memory = tiny.run(ph.compose(tiny.bert(), ph.Arrow(sources, top_k=2)), tiny.batch("bert"))
    monkeypatch.setattr(arrow_impl, "top_right_singular", lambda *_: pytest.fail("an SVD ran"))
    model = ph.compose(tiny.bert(), ph.Arrow(refs, top_k=2, registry=registry), registry=registry)
    torch.testing.assert_close(tiny.run(model, tiny.batch("bert")), in_memory, atol=1e-5, rtol=1e-5)
    assert [p["ref"] for p in model.parents] == refs


def test_search_by_examples_ranks_by_routing_fractions(tmp_path, tokenizer):
    registry = ph.Registry(tmp_path / "reg")
    sources = trained_loras(scale=1.0)
    refs = [registry.add(s, name=f"lora{i}") for i, s in enumerate(sources)]
    registry.add(ph.attach(tiny.bert(), ph.IA3()), name="ia3")
    examples = ["good movie great plot", "the team will win the match", "bank stock price"]
    ranking = registry.search(examples=examples, tokenizer=tokenizer, base_model=tiny.bert())

    base, loras = tiny.bert(), [lora_of(s) for s in sources]
    batch = tokenizer(examples, padding=True, return_tensors="pt")
    inputs, keep = {}, batch["attention_mask"].bool()
    for site in {s for lora in loras for s in lora}:
        base.get_submodule(site).register_forward_hook(
            lambda _m, args, _o, site=site: inputs.__setitem__(site, args[0][keep]))
    tiny.run(base, dict(batch))
    counts, pairs = torch.zeros(len(refs)), 0
    for site, h in inputs.items():
        members = [i for i, lora in enumerate(loras) if site in lora]
        protos = torch.stack([torch.linalg.svd(loras[i][site][2] * loras[i][site][1] @ loras[i][site][0]).Vh[0]
                              for i in members])
        for best in (h.double() @ protos.T).abs().argmax(1).tolist():
            counts[members[best]] += 1
        pairs += h.shape[0]
    expected = {ref: float(c) / pairs for ref, c in zip(refs, counts)}
    assert ranking.metric == "arrow_routing" and "ia3@1" not in ranking.names()
    assert dict(ranking.rows) == pytest.approx(expected)
    assert [s for _, s in ranking.rows] == pytest.approx(sorted(expected.values(), reverse=True))
    assert registry.search(examples=examples, tokenizer=tokenizer, base_model=tiny.bert(), top=1).names() == \
        ranking.names(1)


def test_search_by_examples_needs_a_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="needs tokenizer="):
        ph.Registry(tmp_path / "reg").search(examples=["a text"], base_model=tiny.bert())


# ----- export to PEFT's Arrow -----

@pytest.mark.parametrize("gks", [False, True])
def test_export_loads_in_peft_create_arrow_model_with_the_same_outputs(tmp_path, gks):
    from peft import ArrowConfig, create_arrow_model
    general = clear_loras(1, seed=5, sigma=(0.05, 0.04, 0.03, 0.02)) if gks else None
    ours = ph.compose(tiny.bert(), ph.Arrow(clear_loras(3), top_k=2, temperature=0.5, gks=general))
    out = ph.hub.export_arrow_peft(ours, tmp_path / "arrow")
    config = ArrowConfig(**json.loads((out / "arrow_config.json").read_text()))
    peft_model = create_arrow_model(tiny.bert(), [str(out / f"task_{i}") for i in range(3)], config)
    torch.testing.assert_close(tiny.run(peft_model, tiny.batch("bert")), tiny.run(ours, tiny.batch("bert")),
                               atol=1e-5, rtol=1e-5)


def test_export_refuses_what_peft_arrow_cannot_express(tmp_path):
    mixed = ph.compose(tiny.bert(), ph.Arrow(trained_loras(specs=[(4, ("q", "v")), (2, ("q", "v"))])))
    with pytest.raises(ConfigError, match="same layers with one rank"):
        ph.hub.export_arrow_peft(mixed, tmp_path / "a")
    dense = ph.compose(tiny.bert(), ph.Arrow(trained_loras(specs=[(4, ("q", "o"))] * 2)))
    with pytest.raises(ConfigError, match="routes on every module named"):
        ph.hub.export_arrow_peft(dense, tmp_path / "b")


def test_the_built_model_does_not_keep_the_source_models_alive():
    import gc
    import weakref
    sources = trained_loras()
    alive = [weakref.ref(s) for s in sources]
    model = ph.compose(tiny.bert(), ph.Arrow(sources))
    del sources
    gc.collect()
    assert all(r() is None for r in alive)
    assert ph.routing.arrow_module(model).config.sources == ("source0", "source1", "source2")


def test_a_module_added_before_signatures_gets_one_when_asked(tmp_path):
    import sqlite3
    registry = ph.Registry(tmp_path / "reg")
    ref = registry.add(trained_loras()[0], name="old")
    before = signatures.stored(registry, ref)
    with sqlite3.connect(registry.root / signatures.FILE) as db:
        db.execute("DELETE FROM signatures")
    after = signatures.stored(registry, ref)
    assert before.keys() == after.keys() and all(torch.equal(before[s], after[s]) for s in before)
