"""Tiny randomly initialised models built from configs (from `pelthub.tiny`), and test helpers."""
from __future__ import annotations

import torch

import pelthub as ph
from pelthub.tiny import BUILDERS, FAMILIES, VOCAB, batch, bert, family, gpt2, llama, perturb, roberta, t5  # noqa: F401


def run(model, inputs) -> torch.Tensor:
    """Logits without autograd (some kernels differ in the last bits with and without it)."""
    with torch.no_grad():
        return model(**inputs).logits


def trained(cfg, seed: int = 0, base=None, name: str = "tiny/bert"):
    """A tiny-BERT module (named `name`) with every tensor moved off its initial value."""
    base = base if base is not None else bert()
    base.config.name_or_path = name
    model = ph.attach(base, cfg).eval()
    perturb(model, seed, scale=0.3)
    return model
