"""UniPELT: gate identities, masked means, parameter count, cache plumbing, save/load, on every family."""
import json

import pytest
import torch

import pelthub as ph
from pelthub.errors import ConfigError
from pelthub.modules.config import config_from_dict
from pelthub.routing.gates import masked_mean
from tests import tiny

ARCHS = list(tiny.BUILDERS)
L = 3
APL = ph.UniPELT(lora=ph.LoRA(r=4), prefix=ph.Prefix(length=L, hidden=16), adapter=ph.Bottleneck(reduction=4))


run = tiny.run


def perturb(model, seed=0):
    tiny.perturb(model, seed, scale=0.3)


def unipelt(model, name="composed"):
    return model.adapters[name]["unipelt"]


def twin(arch, source, config):
    """A fresh model with UniPELT(config) holding `source`'s tensors for the parts config keeps."""
    model = ph.compose(tiny.BUILDERS[arch](), config)
    own = unipelt(model).state_dict()
    unipelt(model).load_state_dict({k: v for k, v in unipelt(source).state_dict().items() if k in own})
    return model


def test_config_nests_parts_and_round_trips_through_json():
    data = json.loads(json.dumps(APL.to_dict()))
    assert data["lora"] == {"kind": "lora", "r": 4, "alpha": 16.0, "dropout": 0.0, "targets": None}
    assert data["adapter"]["kind"] == "bottleneck" and data["prefix"]["length"] == L
    assert config_from_dict(data) == APL
    ap = ph.UniPELT(prefix=ph.Prefix(), adapter=ph.Bottleneck())
    assert config_from_dict(ap.to_dict()) == ap and ap.to_dict()["lora"] is None


@pytest.mark.parametrize("kwargs, match", [
    ({}, "at least one"), ({"lora": ph.Prefix()}, "UniPELT.lora must be a LoRA"),
    ({"adapter": ph.Bottleneck(placement="parallel")}, "sequential"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ph.UniPELT(**kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_gate_zero_equals_model_without_lora(arch):
    inputs = tiny.batch(arch)
    model = ph.compose(tiny.BUILDERS[arch](), APL)
    perturb(model)
    unipelt(model).force_gate("lora", 0.0)
    without = twin(arch, model, ph.UniPELT(prefix=APL.prefix, adapter=APL.adapter))
    assert torch.equal(run(model, inputs), run(without, inputs))
    unipelt(model).force_gate("lora", None)
    assert not torch.equal(run(model, inputs), run(without, inputs))


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_gate_zero_equals_model_without_adapter(arch):
    inputs = tiny.batch(arch)
    model = ph.compose(tiny.BUILDERS[arch](), APL)
    perturb(model)
    unipelt(model).force_gate("adapter", 0.0)
    without = twin(arch, model, ph.UniPELT(lora=APL.lora, prefix=APL.prefix))
    assert torch.equal(run(model, inputs), run(without, inputs))


@pytest.mark.parametrize("arch", ARCHS)
def test_masking_the_prefix_columns_equals_model_without_prefix(arch):
    """A prefix gate of 0 leaves zero keys that still take softmax mass; masking the columns removes it."""
    inputs = tiny.batch(arch)
    model = ph.compose(tiny.BUILDERS[arch](), APL)
    perturb(model)
    without = twin(arch, model, ph.UniPELT(lora=APL.lora, adapter=APL.adapter))
    key = "decoder_attention_mask" if arch == "t5" else "attention_mask"
    if arch == "t5":
        inputs[key] = torch.ones_like(inputs["decoder_input_ids"])
    else:  # keep the real tokens' positions where they are without a prefix
        inputs["position_ids"] = torch.arange(inputs["input_ids"].shape[1]).expand_as(inputs["input_ids"])
    expected = run(without, inputs)
    with torch.no_grad(), model.bind(attention_mask=inputs["attention_mask"]) as state:
        kwargs = model.prepare_inputs(dict(inputs), state)
        kwargs[key] = kwargs[key].clone()
        kwargs[key][:, :L] = 0
        got = model.base(**kwargs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_gate_one_equals_the_plain_module_with_scale_one(arch):
    """The LoRA gate replaces α/r; the prefix gate scales both keys and values."""
    base, inputs = tiny.BUILDERS[arch](), tiny.batch(arch)
    model = ph.compose(base, ph.UniPELT(lora=ph.LoRA(r=4), prefix=ph.Prefix(length=L, hidden=None)))
    perturb(model)
    module = unipelt(model)
    module.force_gate("lora", 1.0)
    module.force_gate("prefix", 0.5)
    expected = run(model, inputs)
    plain = ph.attach(tiny.BUILDERS[arch](), ph.LoRA(r=4, alpha=4.0), ph.Prefix(length=L, hidden=None))
    parts = plain.adapters["default"]
    parts["lora"].load_state_dict(module.parts["lora"].state_dict(prefix="layers."))
    with torch.no_grad():
        parts["prefix"].values.copy_(module.parts["prefix"].values * 0.5)
    torch.testing.assert_close(run(plain, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "t5", "llama"])
def test_masked_mean_gates_ignore_padding(arch):
    """An example's gates are the same alone and in a padded batch, whatever the padding tokens are."""
    model = ph.compose(tiny.BUILDERS[arch](), APL)
    perturb(model)
    inputs = tiny.batch(arch)  # the last example has 2 padding positions
    inputs["input_ids"][-1, -2:] = 5
    run(model, inputs)
    padded = unipelt(model).gate_values()
    alone = {k: v[-1:] for k, v in inputs.items()}
    alone["input_ids"], alone["attention_mask"] = alone["input_ids"][:, :-2], alone["attention_mask"][:, :-2]
    run(model, alone)
    single = unipelt(model).gate_values()
    assert padded.keys() == single.keys() and len(padded) > 0
    for site, parts in padded.items():
        for part, g in parts.items():
            torch.testing.assert_close(g[-1:], single[site][part], atol=1e-5, rtol=1e-5)


def test_masked_mean_counts_real_tokens_and_aligns_to_the_last_columns():
    values = torch.tensor([[0.2, 0.4, 0.9, 0.9]])
    assert torch.allclose(masked_mean(values, torch.tensor([[1, 1, 1, 0, 0]])), torch.tensor([0.3]))  # prefix column
    assert torch.allclose(masked_mean(values, torch.tensor([[1, 0]])), torch.tensor([0.5]))  # front columns count
    assert torch.allclose(masked_mean(values, None), values.mean(1))


@pytest.mark.parametrize("arch", ARCHS)
def test_gate_values_per_site_submodule_and_example(arch):
    model = ph.compose(tiny.BUILDERS[arch](), APL)
    inputs = tiny.batch(arch)
    run(model, inputs)
    gates = unipelt(model).gate_values()
    parts = [p for site in gates.values() for p in site]
    n_layers = model.sites.geometry.layers
    assert parts.count("prefix") == n_layers
    assert parts.count("adapter") == len(model.sites.find("ffn_out"))
    assert parts.count("lora") == len(unipelt(model).parts["lora"])
    for site in gates.values():
        for g in site.values():
            assert g.shape == (inputs["input_ids"].shape[0],) and ((g > 0) & (g < 1)).all() and not g.requires_grad
    unipelt(model).force_gate("adapter", 0.25)
    run(model, inputs)
    assert all(torch.all(s["adapter"] == 0.25) for s in unipelt(model).gate_values().values() if "adapter" in s)


def test_trainable_parameters_match_the_formula():
    model = ph.compose(tiny.bert(), APL)
    d, n, m, r, hidden = 32, 2, 32 // 4, 4, 16
    lora = 2 * n * (r * (d + d) + d + 1)                    # q and v: A, B and a Linear(d, 1) gate each
    adapter = n * (d * m + m + m * d + d + d + 1)            # down, up, gate
    prefix = L * d + d * hidden + hidden + hidden * 2 * n * d + 2 * n * d + n * (d + 1)
    assert model.trainable_parameters().trainable == lora + adapter + prefix


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_parts_and_gates_only(arch):
    model = ph.compose(tiny.BUILDERS[arch](), APL)
    perturb(model)
    model.train()
    model(**tiny.batch(arch)).logits.float().pow(2).mean().backward()
    own = {id(p) for _, p in model.module_parameters()}
    assert all(p.grad is None for p in model.base.parameters() if id(p) not in own)
    for name, p in model.module_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_and_detach(arch, tmp_path):
    base, inputs = tiny.BUILDERS[arch](), tiny.batch(arch)
    before = run(base, inputs)
    model = ph.compose(base, APL)
    perturb(model)
    expected = run(model, inputs)
    model.save_pretrained(tmp_path)
    assert torch.equal(run(ph.from_pretrained(tiny.BUILDERS[arch](), tmp_path), inputs), expected)
    model.detach()
    assert torch.equal(run(base, inputs), before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in base.modules())


def test_collapse_keeps_outputs_and_saves_the_collapsed_config(tmp_path):
    model, inputs = ph.compose(tiny.gpt2(), APL), tiny.batch("gpt2")
    perturb(model)
    expected = run(model, inputs)
    unipelt(model).collapse()
    assert unipelt(model).config.prefix.hidden is None
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-6, rtol=1e-6)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(run(ph.from_pretrained(tiny.gpt2(), tmp_path), inputs), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ["t5", "gpt2", "llama"])
def test_generate_gates_the_prefix_once(arch):
    """A prefix gate forced to 0.5 generates like a plain prefix scaled by 0.5: the cache is gated at prefill only."""
    model = ph.compose(tiny.BUILDERS[arch](), ph.UniPELT(prefix=ph.Prefix(length=L, hidden=None)))
    perturb(model)
    unipelt(model).force_gate("prefix", 0.5)
    plain = ph.attach(tiny.BUILDERS[arch](), ph.Prefix(length=L, hidden=None))
    with torch.no_grad():
        plain.adapters["default"]["prefix"].values.copy_(unipelt(model).parts["prefix"].values * 0.5)
    ids = torch.randint(3, tiny.VOCAB, (2, 5))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 8, "do_sample": False}
    assert torch.equal(model.generate(**kwargs), plain.generate(**kwargs))


def test_t5_generate_gates_the_encoder_with_its_mask():
    """generate runs the encoder by itself; its gates must still be masked means over the real tokens."""
    model = ph.compose(tiny.t5(), APL)
    perturb(model)
    inputs = {k: v for k, v in tiny.batch("t5").items() if k != "decoder_input_ids"}
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    generated = {s: p for s, p in unipelt(model).gate_values().items() if s.startswith("encoder.")}
    run(model, {**inputs, "decoder_input_ids": torch.zeros(3, 1, dtype=torch.long)})
    forward = unipelt(model).gate_values()
    assert generated
    for site, parts in generated.items():
        for part, g in parts.items():
            torch.testing.assert_close(g, forward[site][part])


def test_force_gate_rejects_a_missing_part():
    model = ph.compose(tiny.bert(), ph.UniPELT(lora=ph.LoRA(r=2)))
    with pytest.raises(ConfigError, match="no 'prefix' submodule"):
        unipelt(model).force_gate("prefix", 0.0)


def test_gates_on_flattened_ffn_rows_stay_per_example():
    """OPT runs its FFN on (B·n, d) rows: each example's gate must still be its own (batch = each alone)."""
    model = ph.compose(tiny.family("opt"), ph.UniPELT(lora=ph.LoRA(r=2), adapter=ph.Bottleneck(reduction=4)))
    tiny.perturb(model)
    ids = torch.randint(3, tiny.VOCAB, (3, 6))
    with torch.no_grad():
        batch = model(input_ids=ids).logits
        alone = torch.cat([model(input_ids=ids[i:i + 1]).logits for i in range(3)])
        gates = model.adapters["composed"]["unipelt"].gate_values()
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    assert all(g.shape == (1,) for parts in gates.values() for g in parts.values())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5, 1.5, True, "1"])
def test_force_gate_refuses_values_a_gate_cannot_take(value):
    model = ph.compose(tiny.BUILDERS["bert"](), APL)
    with pytest.raises(ConfigError, match="force_gate"):
        unipelt(model).force_gate("lora", value)
    assert "lora" not in unipelt(model).forced
