"""Tiny randomly initialised models built from configs (from `pelthub.tiny`), and test helpers."""
from __future__ import annotations

import torch

from pelthub.tiny import BUILDERS, VOCAB, batch, bert, gpt2, llama, roberta, t5  # noqa: F401


def run(model, inputs) -> torch.Tensor:
    """Logits without autograd (some kernels differ in the last bits with and without it)."""
    with torch.no_grad():
        return model(**inputs).logits


def perturb(model, seed: int = 0, scale: float = 0.1) -> None:
    """Move every module tensor away from its (identity) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.module_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
