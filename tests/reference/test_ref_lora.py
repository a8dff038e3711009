"""LoRA against the base model run with W replaced by W + (α/r)·B·A (ALGORITHMS.md §1, lora.py)."""
from __future__ import annotations

import pytest
import torch

import pelthub as ph
from tests import tiny
from tests.reference.handmade import fill, logits, with_weights

BERT_Q = [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
BERT_V = [f"bert.encoder.layer.{i}.attention.self.value" for i in range(2)]
BERT_K = [f"bert.encoder.layer.{i}.attention.self.key" for i in range(2)]


def lora_layers(model: ph.ModularModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{site name: (A (r, in), B (out, r))} read from the module's state dict."""
    state = model.adapters["default"]["lora"].state_dict()
    keys = {k.rsplit(".", 1)[0] for k in state}
    return {k.removeprefix("layers.").replace("-", "."): (state[f"{k}.lora_a"], state[f"{k}.lora_b"]) for k in keys}


def reference(base_builder, model: ph.ModularModel, scale: float, conv1d: bool = False):
    """A fresh base whose adapted weights are W + scale·B·A (Conv1D keeps W as [in, out])."""
    fresh = base_builder()
    params = dict(fresh.named_parameters())
    edits = {}
    for site, (a, b) in lora_layers(model).items():
        delta = scale * (b @ a)                      # (out, in)
        edits[f"{site}.weight"] = params[f"{site}.weight"] + (delta.T if conv1d else delta)
    return with_weights(fresh, edits)


@pytest.mark.parametrize("r,alpha", [(4, 16.0), (2, 3.0)])
def test_bert_lora_equals_edited_weights(r, alpha):
    model = ph.attach(tiny.bert(), ph.LoRA(r=r, alpha=alpha))
    fill(model.adapters)
    batch = tiny.batch("bert")
    assert sorted(lora_layers(model)) == sorted(BERT_Q + BERT_V)       # default targets: q and v
    assert all(a.shape[0] == r for a, _ in lora_layers(model).values())
    ref = reference(tiny.bert, model, alpha / r)
    torch.testing.assert_close(logits(model, **batch), logits(ref, **batch), atol=1e-5, rtol=1e-5)


def test_gpt2_fused_c_attn_lora_equals_edited_conv1d_weights():
    model = ph.attach(tiny.gpt2(), ph.LoRA(r=4, alpha=8.0))
    fill(model.adapters)
    batch = tiny.batch("gpt2")
    layers = lora_layers(model)
    assert sorted(layers) == [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    assert all(b.shape == (96, 4) for _, b in layers.values())            # fused q, k, v: 3·32 outputs
    ref = reference(tiny.gpt2, model, 8.0 / 4, conv1d=True)
    torch.testing.assert_close(logits(model, **batch), logits(ref, **batch), atol=1e-5, rtol=1e-5)


def test_gpt2_lora_on_mlp_conv1d_targets():
    model = ph.attach(tiny.gpt2(), ph.LoRA(r=2, alpha=2.0, targets=["up", "down"]))
    fill(model.adapters)
    batch = tiny.batch("gpt2")
    assert sorted(lora_layers(model)) == sorted(f"transformer.h.{i}.mlp.{m}" for i in range(2)
                                                for m in ("c_fc", "c_proj"))
    ref = reference(tiny.gpt2, model, 1.0, conv1d=True)
    torch.testing.assert_close(logits(model, **batch), logits(ref, **batch), atol=1e-5, rtol=1e-5)


def test_targets_argument_selects_the_adapted_layers():
    model = ph.attach(tiny.bert(), ph.LoRA(r=2, alpha=2.0, targets=["k"]))
    fill(model.adapters)
    assert sorted(lora_layers(model)) == sorted(BERT_K)
    batch = tiny.batch("bert")
    ref = reference(tiny.bert, model, 1.0)
    torch.testing.assert_close(logits(model, **batch), logits(ref, **batch), atol=1e-5, rtol=1e-5)


def test_dropout_argument_drops_lora_inputs_in_training_only():
    batch = tiny.batch("bert")
    for p, differs in ((0.0, False), (0.5, True)):
        model = ph.attach(tiny.bert(), ph.LoRA(r=2, alpha=2.0, dropout=p))
        fill(model.adapters)
        expected = logits(reference(tiny.bert, model, 1.0), **batch)
        model.adapters.train()                       # the LoRA modules only; the base stays in eval mode
        torch.manual_seed(0)
        got = logits(model, **batch)
        assert (not torch.allclose(got, expected, atol=1e-4)) == differs, p
        model.adapters.eval()
        torch.testing.assert_close(logits(model, **batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,targets", [("bert", None), ("gpt2", ["o"])])
def test_merge_and_unload_writes_the_reference_weights(arch, targets):
    build = tiny.BUILDERS[arch]
    model = ph.attach(build(), ph.LoRA(r=4, alpha=8.0, targets=targets))
    fill(model.adapters)
    ref = reference(build, model, 2.0, conv1d=arch == "gpt2")   # GPT-2 attn.c_proj: a square Conv1D
    merged = dict(model.merge_and_unload().named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(merged[name], p, atol=1e-6, rtol=1e-6)
