"""Prefix tuning against attention computed by hand with the prefix keys/values concatenated
(ALGORITHMS.md §4, prefix.py), and the identity "prefix = the frozen model's cache over s ⇔ s + input".

Flat layout: (L, 2·N·H·d_h) read as (L, 2N, H, d_h), layer ℓ's key at 2ℓ and value at 2ℓ+1.
"""
from __future__ import annotations

import pytest
import torch

import pelthub as ph
from tests import tiny
from tests.reference.handmade import fill, gpt2_by_hand, gpt2_one_layer, logits


def pairs_from_flat(flat: torch.Tensor, layers: int, heads: int, hd: int, batch: int):
    kv = flat.view(flat.shape[0], 2 * layers, heads, hd)
    return [(kv[:, 2 * i].transpose(0, 1).expand(batch, -1, -1, -1),
             kv[:, 2 * i + 1].transpose(0, 1).expand(batch, -1, -1, -1)) for i in range(layers)]


@pytest.mark.parametrize("layers", [1, 2])
def test_direct_prefix_equals_attention_by_hand(layers):
    build = gpt2_one_layer if layers == 1 else tiny.gpt2
    model = ph.attach(build(), ph.Prefix(length=3, hidden=None))
    module = model.adapters["default"]["prefix"]
    assert module.values.shape == (3, 2 * layers * 32)
    batch = tiny.batch("gpt2")
    with torch.no_grad():
        expected = gpt2_by_hand(build(), batch["input_ids"], batch["attention_mask"],
                                prefix=pairs_from_flat(module.values, layers, 4, 8, 3))
    torch.testing.assert_close(logits(model, **batch), expected, atol=1e-5, rtol=1e-5)


def test_reparameterised_prefix_is_the_mlp_by_hand():
    model = ph.attach(gpt2_one_layer(), ph.Prefix(length=4, hidden=16))
    module = model.adapters["default"]["prefix"]
    fill(module, scale=0.5)
    state = module.state_dict()
    assert state["mlp.0.weight"].shape == (16, 32)
    e = state["embedding"]
    flat = torch.tanh(e @ state["mlp.0.weight"].T + state["mlp.0.bias"]) @ state["mlp.2.weight"].T + state["mlp.2.bias"]
    batch = tiny.batch("gpt2")
    with torch.no_grad():
        expected = gpt2_by_hand(gpt2_one_layer(), batch["input_ids"], batch["attention_mask"],
                                prefix=pairs_from_flat(flat, 1, 4, 8, 3))
    torch.testing.assert_close(logits(model, **batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prefix_from_the_cache_over_s_equals_s_before_a_padded_input(arch):
    base = tiny.BUILDERS[arch]()
    s = torch.randint(3, tiny.VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    batch = tiny.batch(arch)
    with torch.no_grad():
        cache = base(input_ids=s, use_cache=True).past_key_values
        full = base(input_ids=torch.cat([s.expand(3, -1), batch["input_ids"]], 1),
                    attention_mask=torch.cat([torch.ones(3, 5, dtype=torch.long), batch["attention_mask"]], 1)).logits
    model = ph.attach(base, ph.Prefix(length=5, hidden=None))
    model.adapters["default"]["prefix"].load_pairs([(layer.keys, layer.values) for layer in cache.layers])
    got = logits(model, **batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], full[:, 5:][real], atol=1e-5, rtol=1e-5)


def test_t5_decoder_prefix_from_the_cache_over_s():
    """Decoder self-attention prefix; one example, since the decoder's cache over s depends on the encoder input."""
    base = tiny.t5()
    batch = {k: v[:1] for k, v in tiny.batch("t5").items()}
    s = torch.randint(3, tiny.VOCAB, (1, 2), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = base(**dict(batch, decoder_input_ids=s), use_cache=True).past_key_values.self_attention_cache
        full = base(**dict(batch, decoder_input_ids=torch.cat([s, batch["decoder_input_ids"]], 1))).logits[:, 2:]
    model = ph.attach(base, ph.Prefix(length=2, hidden=None))
    model.adapters["default"]["prefix"].load_pairs([(layer.keys, layer.values) for layer in cache.layers])
    torch.testing.assert_close(logits(model, **batch), full, atol=1e-5, rtol=1e-5)
