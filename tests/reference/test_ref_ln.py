"""LN-tuning against the base with its LayerNorm γ, β replaced (ALGORITHMS.md §6, ln.py)."""
from __future__ import annotations

import pytest
import torch

import pelthub as ph
from tests import tiny
from tests.reference.handmade import fill, logits, with_weights


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_ln_tuning_equals_replaced_gains_and_biases(arch):
    build = tiny.BUILDERS[arch]
    model = ph.attach(build(), ph.LNTuning())
    fill(model.adapters, scale=0.2)
    deltas = {k.removeprefix("deltas.").replace("--", ".").replace("-", "."): v   # "site--weight" → "site.weight"
              for k, v in model.adapters["default"]["ln"].state_dict().items()}
    fresh = build()
    norms = {f"{n}.{p}" for n, m in fresh.named_modules() if "norm" in type(m).__name__.lower()
             for p, _ in m.named_parameters(recurse=False)}
    assert set(deltas) == norms                                     # every norm, both γ and (where present) β
    params = dict(fresh.named_parameters())
    ref = with_weights(fresh, {name: params[name] + d for name, d in deltas.items()})
    batch = tiny.batch(arch)
    torch.testing.assert_close(logits(model, **batch), logits(ref, **batch), atol=1e-5, rtol=1e-5)
    model.detach()
    torch.testing.assert_close(logits(model.base, **batch), logits(build(), **batch))
