"""Gradient-free few-shot search of LoRA combination weights (LoraHub, Huang et al. 2023).

    w* = argmin_{w ∈ [lo, hi]^K}  L(merge(LoRA₁..LoRA_K, w); examples) + l1 · Σᵢ |wᵢ|

L is the mean loss over the few-shot batches of the base model with the merged
LoRA attached (no gradients: only forward passes). LoraHub optimises with
nevergrad; here scipy's bounded Nelder-Mead, started from w = 0 (the base
model) with a simplex whose other vertices put weight 1 on one module each,
and stopped after `steps` loss evaluations. The default merge is LoraHub's
element-wise "linear" combination of factors; `method="cat"` searches over the
exact weighted sums of the deltas instead (see merge.py).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..generative import batches as generative_batches
from ..modules.config import finite_numbers, positive_int
from ..model import ModularModel
from ..tasks.generative import is_generative
from .blocks import Source
from .compose import compose
from .merge import load_factors, lora_sources, merge, merge_factors

Batch = Mapping[str, Any]
LossFn = Callable[[ModularModel, Batch], torch.Tensor]


def search_weights(base: nn.Module, modules: Sequence[Source], examples: Batch | Iterable[Batch] | Any,
                   loss_fn: LossFn | None = None, method: str = "linear", steps: int = 40, l1: float = 0.05,
                   bounds: tuple[float, float] = (-1.5, 1.5), name: str = "lorahub",
                   registry: Any = None, tokenizer: Any = None) -> tuple[ModularModel, list[float]]:
    """Find combination weights of LoRA `modules` on a few examples; return (model, weights).

    examples: one batch (a dict of model inputs with `labels`) or a list of them; or generative
    examples (`GenerativeExample`s, input/target rows or a 🤗 `datasets` table) with `tokenizer`,
    encoded in batches of 32 whose loss is the causal or seq2seq LM loss over the target tokens.
    loss_fn(model, batch) -> scalar loss; default `model(**batch).loss`.
    The model is `base` with the merged LoRA attached under `name` (frozen; `name-1`, ...
    if `base` is a ModularModel that has a set of that name already).
    """
    if is_generative(examples):
        if tokenizer is None:
            raise ConfigError("search_weights on generative examples needs tokenizer= to encode them")
        batches = list(generative_batches(base, examples, tokenizer, 32, shuffle=False))
    else:
        batches = [examples] if isinstance(examples, Mapping) else list(examples)
    if not batches:
        raise ConfigError("search_weights needs at least one example batch")
    positive_int("search_weights", "steps", steps)
    finite_numbers("search_weights", "l1", (l1,), 1)
    lo, hi = finite_numbers("search_weights", "bounds", bounds, 2)
    if not lo < hi:
        raise ConfigError(f"search_weights bounds must be (low, high) with low < high, got {bounds!r}")
    loras = lora_sources(modules, base, registry)
    k = len(loras)
    merged = merge(loras, [0.0] * k, method=method)
    model = compose(base, merged, name=name)
    target, loss_fn = model.adapters[list(model.adapters)[-1]]["lora"], loss_fn or _model_loss
    rank = merged.config.r
    best: dict[str, Any] = {"value": float("inf"), "w": np.zeros(k)}

    def objective(w: np.ndarray) -> float:
        load_factors(target, merge_factors(loras, torch.from_numpy(w).float(), method, rank))
        with torch.no_grad():
            loss = sum(float(loss_fn(model, b)) for b in batches) / len(batches)
        value = loss + l1 * float(np.abs(w).sum())
        if value < best["value"]:
            best.update(value=value, w=w.copy())
        return value

    from scipy.optimize import minimize  # scipy loads in ~0.5 s: only when a search runs
    training = model.training
    model.eval()
    try:
        start = np.clip(np.zeros(k), lo, hi)
        simplex = np.clip(np.vstack([start, start + np.eye(k)]), lo, hi)
        minimize(objective, start, method="Nelder-Mead", bounds=[(lo, hi)] * k,
                 options={"maxfev": steps, "initial_simplex": simplex})
    finally:
        model.train(training)
    load_factors(target, merge_factors(loras, torch.from_numpy(best["w"]).float(), method, rank))
    return model, [float(x) for x in best["w"]]


def _model_loss(model: ModularModel, batch: Batch) -> torch.Tensor:
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise ConfigError("the examples give no loss: include `labels` in each batch or pass loss_fn=")
    return out.loss
