"""The transformers facts pelthub relies on (pelthub/model/compat.py), pinned so a release that changes one fails here.

Each test states a fact about the installed transformers, or that pelthub raises
(never skips) when a fact does not hold.
"""
import inspect
import warnings

import pytest
import torch
import transformers
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

import pelthub as ph
from pelthub.errors import UnsupportedModelError
from pelthub.model.compat import cache_keyword, is_checkpointing, self_attention_layers
from pelthub.routing.gates import UniPELTModule
from tests import tiny
from tests.tiny import perturb

NEW_KEYWORD = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
def test_the_cache_keyword_is_the_one_the_release_documents(arch):
    model = tiny.BUILDERS[arch]()
    keyword = cache_keyword(model)
    assert keyword == ("cache" if NEW_KEYWORD else "past_key_values")
    inner = getattr(model, "base_model", model)
    assert keyword in inspect.signature(type(model).forward).parameters or \
        keyword in inspect.signature(type(inner).forward).parameters


def test_a_model_without_a_cache_argument_is_refused_with_the_version():
    class NoCache(nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(UnsupportedModelError, match=transformers.__version__.replace(".", r"\.")):
        cache_keyword(NoCache())


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
def test_prefix_forward_and_generate_raise_no_deprecation_warning(arch):
    """pelthub passes the cache the way the installed release expects (5.24 warns on past_key_values=)."""
    model = ph.attach(tiny.BUILDERS[arch](), ph.Prefix(length=2, hidden=None)).eval()
    inputs = tiny.batch(arch)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        with torch.no_grad():
            model(**inputs)
        if arch != "bert":
            gen = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
            model.generate(**gen, max_new_tokens=2, do_sample=False)


def test_cache_layers_expose_keys_and_values():
    k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    for cache in (DynamicCache([(k, v)]), EncoderDecoderCache(DynamicCache([(k, v)]), DynamicCache())):
        (layer,) = self_attention_layers(cache)
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_checkpointing_flag_follows_enable_and_disable():
    model = tiny.bert().train()
    assert not is_checkpointing(model)
    wrapped = ph.attach(model, ph.LoRA(r=2))
    wrapped.gradient_checkpointing_enable()
    assert is_checkpointing(model)
    wrapped.gradient_checkpointing_disable()
    assert not is_checkpointing(model)


def test_a_prefix_gate_that_does_not_run_raises_instead_of_skipping(monkeypatch):
    """If a release stops calling the hooked attention modules, UniPELT says so (it once skipped silently)."""
    monkeypatch.setattr(UniPELTModule, "_prefix_hook", lambda self, key, index: lambda *a, **k: None)
    model = ph.compose(tiny.bert(), ph.UniPELT(prefix=ph.Prefix(length=2, hidden=None)))
    perturb(model)
    with pytest.raises(UnsupportedModelError, match="prefix gate did not run"):
        model(**tiny.batch("bert"))


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
def test_the_prefix_gate_runs_in_every_layer_and_learns(arch):
    model = ph.compose(tiny.BUILDERS[arch](), ph.UniPELT(prefix=ph.Prefix(length=2, hidden=None)))
    perturb(model)
    model(**tiny.batch(arch)).logits.square().sum().backward()
    unipelt = model.adapters["composed"]["unipelt"]
    assert sum("prefix" in parts for parts in unipelt.gate_values().values()) == len(unipelt.prefix_layers) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in unipelt.gates["prefix"].parameters())


def test_doctor_passes_here_and_fails_loudly_when_a_check_breaks(monkeypatch, capsys):
    from pelthub import selfcheck as doctor
    assert doctor.report(quick=True) == 0
    monkeypatch.setattr(UniPELTModule, "_prefix_hook", lambda self, key, index: lambda *a, **k: None)
    assert doctor.report(quick=True) == 1
    out = capsys.readouterr().out
    assert "[FAIL] UniPELT prefix gate on bert" in out and "FAILED:" in out
