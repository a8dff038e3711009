"""How prompts and prefixes enter a model: through `inputs_embeds` and a pre-filled cache.

These functions take and return the keyword arguments of one forward call, so
the base model's own forward runs unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, EncoderDecoderCache

from ..errors import ConfigError
from .compat import given_cache, self_attention_layers
from ..sites import Geometry


def _ones(batch: int, length: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(batch, length, dtype=like.dtype, device=like.device)


def input_embeddings(kwargs: dict[str, Any], embed: torch.nn.Module) -> torch.Tensor:
    """`inputs_embeds`, computed from `input_ids` if needed (both keys are removed)."""
    embeds = kwargs.pop("inputs_embeds", None)
    ids = kwargs.pop("input_ids", None)
    return embed(ids) if embeds is None else embeds


def prepend_prompt(kwargs: dict[str, Any], embeds: torch.Tensor, prompt: torch.Tensor, g: Geometry) -> dict[str, Any]:
    """Put `prompt` (B, L, d) before `embeds` and widen the masks, token types, positions and labels."""
    batch, length = prompt.shape[:2]
    out = dict(kwargs, inputs_embeds=torch.cat([prompt.to(embeds.dtype), embeds], dim=1))
    mask = kwargs.get("attention_mask")
    if mask is not None:
        out["attention_mask"] = torch.cat([_ones(batch, length, mask), mask], dim=1)
    if kwargs.get("token_type_ids") is not None:
        tt = kwargs["token_type_ids"]
        out["token_type_ids"] = torch.cat([torch.zeros_like(tt[:, :1]).expand(batch, length), tt], dim=1)
    if kwargs.get("position_ids") is not None:
        pos = kwargs["position_ids"]
        start = torch.arange(length, device=pos.device).expand(pos.shape[0], -1)
        out["position_ids"] = torch.cat([start, pos + length], dim=1)
    if g.decoder_only and kwargs.get("labels") is not None and kwargs["labels"].dim() == 2:  # token labels only
        labels = kwargs["labels"]
        out["labels"] = torch.cat([torch.full((labels.shape[0], length), -100, dtype=labels.dtype,
                                              device=labels.device), labels], dim=1)
    return out


def prefix_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]], g: Geometry,
                 dtype: torch.dtype) -> DynamicCache | EncoderDecoderCache:
    """A fresh cache holding the prefix (decoder self-attention for encoder-decoder models).

    Caches are mutated in place by the model, so one is built for every call. The
    prefix weights stay fp32; the keys and values are cast to the base's `dtype`
    here, at the boundary, because attention needs one dtype for q, k and v.
    """
    cache = DynamicCache([(k.to(dtype), v.to(dtype)) for k, v in pairs])
    return EncoderDecoderCache(cache, DynamicCache()) if g.encoder_decoder else cache


def add_prefix(kwargs: dict[str, Any], cache: DynamicCache | EncoderDecoderCache, keyword: str, g: Geometry,
               batch: int, device: torch.device) -> dict[str, Any]:
    """Pass the prefix `cache` under the model's cache `keyword` and give the masks L leading "attend" columns."""
    refuse_given_cache(kwargs)
    length = cache_length(cache)
    out = dict(kwargs, **{keyword: cache})
    key = "decoder_attention_mask" if g.encoder_decoder else "attention_mask"
    mask = kwargs.get(key)
    if mask is None and not g.encoder_decoder:
        n = (kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape[1]
        mask = torch.ones(batch, n, dtype=torch.long, device=device)
    if mask is not None:
        out[key] = torch.cat([_ones(batch, length, mask), mask], dim=1)
    return out


def refuse_given_cache(kwargs: dict[str, Any]) -> None:
    """A prefix module builds the call's cache itself; one passed in would be replaced silently."""
    if given_cache(kwargs) is not None:
        raise ConfigError("a prefix module builds the cache itself; do not pass past_key_values= or cache=")


def cache_length(cache: DynamicCache | EncoderDecoderCache) -> int:
    """Positions the prefix cache holds (L)."""
    return self_attention_layers(cache)[0].keys.shape[2]
