"""KAdaptation with one Kronecker term exports to PEFT's LoKr: PEFT gives the same outputs within 1e-5."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

import pelthub as ph
from pelthub.errors import ConfigError
from pelthub.hub import export
from tests import tiny

peft = pytest.importorskip("peft")

CASES = {  # name: (config, PEFT tensors per layer)
    "factored-w2": (ph.KAdaptation(n=1, a=4, scale=0.7), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),  # in/a = out/a = 8
    "factored-w2-at-the-edge": (ph.KAdaptation(n=1, a=8, scale=1.0), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),  # 4 > 2r
    "whole-w2": (ph.KAdaptation(n=1, a=16, scale=1.3), {"lokr_w1", "lokr_w2"}),  # in/a = out/a = 2
    "rectangular": (ph.KAdaptation(n=1, a=4, scale=0.5, targets=("q", "down")),  # down: 64 → 32
                    {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
}


def moved(model, zero_bias=True):
    """Every KAdaptation tensor moved off its initial value (the bias too unless `zero_bias`)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.module_parameters():
            p.copy_(torch.zeros_like(p) if zero_bias and name.endswith(".bias") else torch.randn(p.shape, generator=g))
    return model.eval()


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("case", CASES)
def test_one_term_exports_as_lokr_with_the_same_outputs(case, tmp_path):
    config, tensors = CASES[case]
    model = moved(ph.attach(tiny.bert(), config))
    export(model, tmp_path)
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (adapter["peft_type"], adapter["r"], adapter["alpha"]) == ("LOKR", 1, config.scale)
    assert {k.rsplit(".", 1)[1] for k in load_file(str(tmp_path / "adapter_model.safetensors"))} == tensors
    inputs = tiny.batch("bert")
    expected = logits(model, inputs)
    assert (expected - logits(tiny.bert(), inputs)).abs().max() > 1e-3  # the module does something
    loaded = peft.PeftModel.from_pretrained(tiny.bert(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=1e-5)


def test_what_lokr_cannot_hold_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="n=2"):
        export(moved(ph.attach(tiny.bert(), ph.KAdaptation(n=2, a=4))), tmp_path / "n")
    with pytest.raises(ConfigError, match="bias b is nonzero"):
        export(moved(ph.attach(tiny.bert(), ph.KAdaptation(n=1, a=4)), zero_bias=False), tmp_path / "b")
    narrow = BertForSequenceClassification(BertConfig(vocab_size=tiny.VOCAB, hidden_size=24, num_hidden_layers=1,
                                                      num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ConfigError, match=r"one decompose_factor.*a=\[8, 24\]"):  # q: 24 → 24; down: 64 → 24
        export(ph.attach(narrow, ph.KAdaptation(n=1, targets=("q", "down"))), tmp_path / "a")
    with pytest.raises(ConfigError, match="Conv1D"):
        export(ph.attach(tiny.gpt2(), ph.KAdaptation(n=1, a=4)), tmp_path / "g")
