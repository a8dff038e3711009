"""`generate` with prompts and prefixes: inject once, at the first step, then let transformers run.

Prompts enter as `inputs_embeds`. A prefix enters as a pre-filled cache. For
decoder-only models the inputs are padded with L placeholder positions, which
the cache already covers (transformers slices them off, so they are never
embedded), and the placeholders are cut from the result. For encoder-decoder
models the decoder starts from its start token with the prefix as its past.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..modules.base import CallState
from .compat import cache_keyword
from .inputs import cache_length, input_embeddings, prefix_cache, prepend_prompt, refuse_given_cache

if TYPE_CHECKING:
    from .modular import ModularModel


def generate(model: "ModularModel", state: CallState, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
    base, g, ctx = model.base, model.sites.geometry, model.ctx
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    prompters, prefixers = model.modules_of("prompt"), model.modules_of("prefix")
    if prompters:
        embeds = input_embeddings(inputs, base.get_input_embeddings())
        for m in prompters:
            inputs = prepend_prompt(inputs, embeds, m.prompt(embeds, inputs["attention_mask"], ctx), g)
            embeds = inputs["inputs_embeds"]
    length = 0
    if prefixers:
        batch = input_ids.shape[0]
        refuse_given_cache(kwargs)
        if not _setting(base, kwargs, "use_cache", True):
            raise ConfigError("a prefix lives in the cache, so generate needs use_cache=True; with "
                              "use_cache=False the prefix would be dropped after the first token")
        # transformers widens the inputs per beam and per returned sequence, but not a cache it is given
        wide = batch * _setting(base, kwargs, "num_beams", 1) * _setting(base, kwargs, "num_return_sequences", 1)
        state.cache = prefix_cache(prefixers[0].prefix(wide, ctx), g, model.dtype)
        length = cache_length(state.cache)
        inputs[cache_keyword(base)] = state.cache
        if g.encoder_decoder:
            start = base.generation_config.decoder_start_token_id
            start = base.config.decoder_start_token_id if start is None else start
            inputs["decoder_input_ids"] = torch.full((batch, 1), start, device=input_ids.device)
        else:
            inputs = _pad_front(inputs, length)
    out = base.generate(**inputs, **kwargs)
    if g.encoder_decoder:
        return out
    if prompters:  # generating from embeddings returns the new tokens only, per returned sequence
        return torch.cat([input_ids.repeat_interleave(out.shape[0] // input_ids.shape[0], 0), out], dim=1)
    return out[:, length:]


def _setting(base: Any, kwargs: dict[str, Any], name: str, default: Any) -> Any:
    """A generation setting: the call's, else the model's generation_config, else `default`."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    value = getattr(getattr(base, "generation_config", None), name, None)
    return default if value is None else value


def _pad_front(inputs: dict[str, Any], length: int) -> dict[str, Any]:
    """L placeholder positions before the input (the cache holds the prefix there)."""
    mask = inputs["attention_mask"]
    ones = torch.ones(mask.shape[0], length, dtype=mask.dtype, device=mask.device)
    out = dict(inputs, attention_mask=torch.cat([ones, mask], dim=1))
    if "inputs_embeds" in inputs:
        e = inputs["inputs_embeds"]
        out["inputs_embeds"] = torch.cat([e.new_zeros(e.shape[0], length, e.shape[2]), e], dim=1)
    else:
        ids = inputs["input_ids"]
        out["input_ids"] = torch.cat([ids.new_zeros(ids.shape[0], length), ids], dim=1)
    return out
