"""The few facts about transformers that pelthub relies on, found in one place and checked.

- The keyword under which a model's `forward` (and so `generate`) takes a
  pre-filled cache: `cache` from transformers 5.24 on, `past_key_values`
  before (5.24 still accepts it with a deprecation warning; 5.40 drops it).
  pelthub reads the name off the public signature, never guesses it.
- A cache's per-layer key and value tensors (`cache.layers[i].keys` /
  `.values`; an `EncoderDecoderCache` holds the decoder's self-attention
  cache as `.self_attention_cache`): prefixes are read and UniPELT's prefix
  gate scales them there.

Where either is missing, pelthub raises `UnsupportedModelError` naming the
transformers version and the model, never skips the prefix silently.
`tests/test_compat.py` pins each fact, so a release that changes one turns
CI red.
"""
from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Callable

import torch
import transformers

from ..errors import UnsupportedModelError

CACHE_KEYWORDS = ("cache", "past_key_values")  # newest first


@lru_cache(maxsize=None)
def _keyword_of(forward: Callable) -> str | None:
    params = inspect.signature(forward).parameters
    return next((name for name in CACHE_KEYWORDS if name in params), None)


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword `model`'s forward takes a cache under (`cache` or `past_key_values`).

    Task heads (`...ForSequenceClassification`) often take `**kwargs` and hand them to
    the backbone (`model.base_model`), whose signature names the keyword.
    """
    inner = getattr(model, "base_model", model)
    name = _keyword_of(type(model).forward) or _keyword_of(type(inner).forward)
    if name is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}.forward takes neither `cache=` nor `past_key_values=` (transformers "
            f"{transformers.__version__}); pelthub passes prefixes as a pre-filled cache, so prefix modules cannot "
            "run on this model. Use a prompt (ph.Prompt) instead, or a transformers release pelthub supports "
            "(`pelthub doctor` lists them)")
    return name


def given_cache(kwargs: dict[str, Any]) -> Any:
    """The cache the caller passed under either keyword, or None."""
    return next((kwargs[k] for k in CACHE_KEYWORDS if kwargs.get(k) is not None), None)


def self_attention_layers(cache: Any) -> list[Any]:
    """The per-layer entries (with `.keys` / `.values`) of a decoder self-attention cache."""
    cache = getattr(cache, "self_attention_cache", cache)
    layers = getattr(cache, "layers", None)
    if layers is None or (len(layers) and not all(hasattr(l, "keys") and hasattr(l, "values") for l in layers)):
        raise UnsupportedModelError(
            f"{type(cache).__name__} has no per-layer `.layers[i].keys/.values` (transformers "
            f"{transformers.__version__}); pelthub's prefix gate needs them. `pelthub doctor` lists the tested "
            "releases")
    return list(layers)


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on in any layer of `model`.

    Every 5.x release marks checkpointed modules with a `gradient_checkpointing`
    attribute (5.24 renamed the methods to `activation_checkpointing_*`, not the flag).
    """
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def enable_checkpointing(model: torch.nn.Module, checkpoint_kwargs: dict[str, Any]) -> None:
    """Turn checkpointing on with `torch.utils.checkpoint.checkpoint(**checkpoint_kwargs)`."""
    if hasattr(model, "activation_checkpointing_enable"):  # 5.24 on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def disable_checkpointing(model: torch.nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
