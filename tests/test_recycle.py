"""Embedding recycling: the cached run equals the full run, outputs and gradients, on a tiny BERT.

References: the uncached model itself on the same inputs, and the base's own hidden states
(`output_hidden_states`) for the cache.
"""
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import pelthub as ph
from pelthub.errors import ConfigError, UnsupportedModelError
from tests import tiny

TOP = ("bert.encoder.layer.2.attention.self.query", "bert.encoder.layer.2.attention.self.value",
       "bert.encoder.layer.3.output.dense")


def bert4():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=tiny.VOCAB, hidden_size=32, num_hidden_layers=4,
                                                    num_attention_heads=4, intermediate_size=64)).eval()


def top_lora():
    model = ph.attach(bert4(), ph.LoRA(r=2, targets=TOP), head=True)
    tiny.perturb(model, seed=2, scale=0.3)
    return model.eval()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cache_is_the_hidden_state_entering_the_lowest_module_layer():
    model, inputs = top_lora(), tiny.batch("bert", b=5)
    hidden, top = ph.recycle(model, inputs, batch_size=2)
    assert top.start == 2
    with torch.no_grad():
        want = bert4()(**inputs, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(hidden, want, rtol=0, atol=1e-6)
    model.train()  # dropout below the modules stays off in the cache, and the mode comes back
    torch.testing.assert_close(ph.recycle(model, inputs)[0], want, rtol=0, atol=1e-6)
    assert model.training


def test_outputs_and_gradients_equal_the_uncached_run():
    model, inputs = top_lora(), tiny.batch("bert", b=5)
    labels = torch.tensor([0, 1, 1, 0, 1])
    hidden, top = ph.recycle(model, inputs)
    full = model(**inputs, labels=labels)
    full.loss.backward()
    want = grads(model)
    model.zero_grad()
    cached = top(hidden, **inputs, labels=labels)
    cached.loss.backward()
    assert torch.equal(cached.logits, full.logits) and torch.equal(cached.loss, full.loss)
    found = grads(model)
    assert found.keys() == want.keys() and any("classifier" in n for n in found)
    for name in want:
        assert torch.equal(found[name], want[name]), name
    # the base has all its layers back, and a row subset of the cache runs as that subset
    assert len(model.base.bert.encoder.layer) == 4
    with torch.no_grad():
        part = top(hidden[1:3], **{k: v[1:3] for k, v in inputs.items()}).logits
    torch.testing.assert_close(part, full.logits[1:3].detach())


def test_training_on_the_cache_follows_the_uncached_training():
    inputs, labels = tiny.batch("bert", b=4), torch.tensor([0, 1, 1, 0])
    runs = []
    for cached in (False, True):
        model = top_lora()
        hidden, top = ph.recycle(model, inputs)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):
            out = top(hidden, **inputs, labels=labels) if cached else model(**inputs, labels=labels)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        runs.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_a_failing_forward_gives_the_layers_back():
    model, inputs = top_lora(), tiny.batch("bert")
    hidden, top = ph.recycle(model, inputs)
    with pytest.raises(Exception):
        top(hidden[:, :3], **inputs)  # the cache does not fit the inputs' length
    assert len(model.base.bert.encoder.layer) == 4
    assert torch.equal(tiny.run(model, inputs), tiny.run(top_lora(), inputs))


def test_models_with_nothing_to_cache_are_refused():
    inputs = tiny.batch("bert")
    with pytest.raises(ConfigError, match="at or below the first layer"):
        ph.recycle(ph.attach(bert4(), ph.LoRA(r=2)), inputs)
    with pytest.raises(ConfigError, match="change the input of every layer"):
        ph.recycle(ph.attach(bert4(), ph.Prompt(length=2)), inputs)
    with pytest.raises(ConfigError, match="no module sits in the layers"):
        ph.recycle(ph.attach(bert4(), ph.LoRA(r=2, targets=("classifier",))), inputs)
    with pytest.raises(UnsupportedModelError, match="one stack of layers"):
        ph.recycle(ph.attach(tiny.t5(), ph.LoRA(r=2)), tiny.batch("t5"))
    with pytest.raises(ConfigError, match="model with modules attached"):
        ph.recycle(bert4(), inputs)
    with pytest.raises(ConfigError, match="one row count"):
        ph.recycle(top_lora(), {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"][:2]})


@pytest.mark.parametrize("arch,target", [("llama", "model.layers.1.self_attn.q_proj"),
                                         ("gpt2", "transformer.h.1.attn.c_attn")])
def test_causal_lms_recycle_exactly(arch, target):
    model = ph.attach(tiny.BUILDERS[arch](), ph.LoRA(r=2, targets=(target,)))
    tiny.perturb(model, seed=1, scale=0.3)
    inputs = tiny.batch(arch)
    hidden, top = ph.recycle(model.eval(), inputs)
    full = model(**inputs, labels=inputs["input_ids"])
    cached = top(hidden, **inputs, labels=inputs["input_ids"])
    assert top.start == 1 and torch.equal(cached.logits, full.logits)
    full.loss.backward()
    want = grads(model)
    model.zero_grad()
    cached.loss.backward()
    assert all(torch.equal(g, want[n]) for n, g in grads(model).items())
