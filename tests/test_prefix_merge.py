"""Prefix merging: related prefixes averaged into one direct prefix that then tunes few-shot.

The reference is the hand average of the sources' key/value tensors, each read from the
source itself (a reparameterised source through its own MLP, computed here).
"""
import pytest
import torch

import pelthub as ph
from pelthub.errors import ConfigError, IncompatibleModuleError
from pelthub.tasks.generative import GenerativeExample as G
from pelthub.training import fit
from tests import tiny
from tests.test_generative import tok  # noqa: F401  (pytest fixture)


def prefix_model(config, seed, base=tiny.llama):
    model = ph.attach(base(), config)
    tiny.perturb(model, seed, scale=0.5)
    return model.eval()


def hand_tensor(model) -> torch.Tensor:
    """(L, 2·N·heads·head_dim) of a source: its values, or its MLP applied to its embedding."""
    m = model.adapters["default"]["prefix"]
    if m.config.hidden is None:
        return m.values.detach()
    first, last = m.mlp[0], m.mlp[2]
    return (torch.tanh(m.embedding @ first.weight.T + first.bias) @ last.weight.T + last.bias).detach()


def test_merged_prefix_is_the_weighted_hand_average_of_the_sources(tmp_path):
    sources = [prefix_model(ph.Prefix(length=3, hidden=None), 1), prefix_model(ph.Prefix(length=3, hidden=8), 2),
               prefix_model(ph.Prefix(length=3, hidden=None), 3)]
    registry = ph.Registry(tmp_path / "registry")
    ref = registry.add(sources[2], name="related-prefix", task="t")
    weights = [0.5, 0.3, 0.2]
    merged = ph.merge_prefixes([sources[0], sources[1].adapters["default"]["prefix"], ref], weights,
                               base=tiny.llama(), registry=registry)
    want = sum(w * hand_tensor(m) for w, m in zip(weights, sources))
    assert merged.config == ph.Prefix(length=3, hidden=None)
    torch.testing.assert_close(merged.values.detach(), want)
    mean = ph.merge_prefixes(sources)
    torch.testing.assert_close(mean.values.detach(), sum(hand_tensor(m) for m in sources) / 3)

    # as a composition block: the attached prefix holds the same average, and runs as that prefix
    composed = ph.compose(tiny.llama(), ph.WeightedSum(sources, weights))
    torch.testing.assert_close(composed.adapters["composed"]["prefix"].values.detach(), want)
    by_hand = ph.attach(tiny.llama(), ph.Prefix(length=3, hidden=None)).eval()
    with torch.no_grad():
        by_hand.adapters["default"]["prefix"].values.copy_(want)
    inputs = tiny.batch("llama")
    torch.testing.assert_close(tiny.run(composed, inputs), tiny.run(by_hand, inputs))


def test_merged_prefix_tunes_few_shot_on_the_target(tok):  # noqa: F811
    sources = [prefix_model(ph.Prefix(length=2, hidden=None), s) for s in (1, 2)]
    model = ph.compose(tiny.llama(), ph.merge_prefixes(sources))
    prefix = model.adapters["composed"]["prefix"]
    start = prefix.values.detach().clone()
    prefix.requires_grad_(True)
    few = [G("a b", "c d"), G("e f", "g"), G("h", "i j")]
    losses = fit(model, few, tok, steps=15, batch_size=3, lr=5e-2, progress=False)
    assert losses[-1] < losses[0]
    assert not torch.equal(prefix.values.detach(), start)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["adapters.composed.prefix.values"]


def test_prefixes_of_other_lengths_sites_or_kinds_are_refused():
    short, long = prefix_model(ph.Prefix(length=2, hidden=None), 1), prefix_model(ph.Prefix(length=3, hidden=None), 2)
    with pytest.raises(IncompatibleModuleError, match="prefix 1 has length 3.*one length"):
        ph.merge_prefixes([short, long])
    other_base = prefix_model(ph.Prefix(length=2, hidden=None), 3, base=tiny.t5)
    with pytest.raises(IncompatibleModuleError, match="different architectures"):
        ph.merge_prefixes([short, other_base])
    with pytest.raises(IncompatibleModuleError, match=r"prefix 1 sits at .*different base models"):
        ph.merge_prefixes([short.adapters["default"]["prefix"], other_base.adapters["default"]["prefix"]])
    with pytest.raises(ConfigError, match="prefix modules only"):
        ph.merge_prefixes([short, ph.attach(tiny.llama(), ph.LoRA(r=2))])
    with pytest.raises(ConfigError, match="at least one prefix"):
        ph.merge_prefixes([])
    with pytest.raises(ConfigError, match="weights"):
        ph.merge_prefixes([short, short], [1.0])
