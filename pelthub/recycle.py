"""Embedding recycling: compute the frozen layers below the lowest module once, train on the cache.

When every module sits at layer k or above (say a LoRA on the top layers), layers 0..k-1 see
only frozen weights, so their output for an input never changes while the modules train.
`recycle` runs them once and returns that output (the hidden states entering layer k) with a
`Recycled` model whose forward starts at layer k: it runs the base's own forward over layers
k.. only, feeding the cached states into layer k, so outputs and gradients are those of the
full model. Each epoch then pays for the top layers alone (the embedding lookup still runs;
its output is replaced).

    hidden, top = ph.recycle(model, inputs)            # inputs: input_ids, attention_mask, ...
    out = top(hidden[i], **{k: v[i] for k, v in inputs.items()}, labels=y[i])

The cache is taken with the model in eval mode: dropout below the modules is off, as it is
for any cached feature.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from .errors import ConfigError, UnsupportedModelError
from .model import ModularModel


class _Reached(Exception):
    """Raised by the capture hook: the cache is taken, the layers above need not run."""


def lowest_layer(model: ModularModel) -> int:
    """Index of the lowest layer holding a module; refuses modules below the layer stack or at the input."""
    if not isinstance(model, ModularModel):
        raise ConfigError(f"recycle takes a model with modules attached (ph.attach), got {type(model).__name__}")
    if len(model.sites.stacks) != 1:
        raise UnsupportedModelError(f"recycle needs one stack of layers; {type(model.base).__name__} has "
                                    f"{len(model.sites.stacks)} (encoder-decoder models are not supported)")
    at_input = [m.config.kind for s in model.adapters.values() for m in s.values()
                if m.provides("prompt") or m.provides("prefix")]
    if at_input:
        raise ConfigError(f"{at_input} modules change the input of every layer, so nothing below them can be "
                          "cached; recycle models whose modules sit on upper layers (LoRA, IA3, adapters)")
    stack = model.sites.stacks[0]
    names = [n for n, _ in model.base.named_modules()]
    hooked = [n for n, m in model.base.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    below = [n for n in hooked if names.index(n) < names.index(stack[0])]
    layers = [i for i, layer in enumerate(stack) for n in hooked if n == layer or n.startswith(layer + ".")]
    if below or (layers and min(layers) == 0):
        raise ConfigError(f"a module sits at {(below or [stack[0]])[0]!r}, at or below the first layer, so there is "
                          "nothing below it to cache; recycle models whose modules sit on upper layers")
    if not layers:
        raise ConfigError("no module sits in the layers, so all of them could be cached: train the head on "
                          "the base's outputs instead")
    return min(layers)


class Recycled(nn.Module):
    """`model` started at layer `start`: forward(hidden_states, **inputs) takes the cached states entering
    that layer plus the inputs of the full model (masks, labels, ...), and returns the full model's output."""

    def __init__(self, model: ModularModel, start: int):
        super().__init__()
        self.model, self.start = model, start
        parent, _, self.attribute = model.sites.stacks[0][0].rpartition(".")[0].rpartition(".")
        self.parent = model.base.get_submodule(parent) if parent else model.base

    @contextmanager
    def _from_layer(self, hidden: torch.Tensor) -> Iterator[None]:
        """The layer stack cut to layers start.., its first layer reading `hidden` instead of its input."""
        full = getattr(self.parent, self.attribute)
        top = nn.ModuleList(list(full)[self.start:])
        handle = top[0].register_forward_pre_hook(lambda _m, args, kwargs: _replaced(args, kwargs, hidden),
                                                  with_kwargs=True)
        setattr(self.parent, self.attribute, top)
        try:
            yield
        finally:
            setattr(self.parent, self.attribute, full)
            handle.remove()

    def forward(self, hidden_states: torch.Tensor, **inputs: Any) -> Any:
        with self._from_layer(hidden_states):
            return self.model(**inputs)


def _replaced(args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    return (hidden, *args[1:]), kwargs


@torch.no_grad()
def recycle(model: ModularModel, inputs: dict[str, torch.Tensor],
            batch_size: int = 64) -> tuple[torch.Tensor, Recycled]:
    """(hidden states entering the lowest layer with a module, for every row of `inputs`; the model
    started there). `inputs` are the tensors the model reads (input_ids, attention_mask, ...), all rows
    padded to one length; they are run `batch_size` rows at a time."""
    start = lowest_layer(model)
    layer = model.base.get_submodule(model.sites.stacks[0][start])
    found: list[torch.Tensor] = []

    def capture(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        found.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        raise _Reached

    rows = {len(v) for v in inputs.values()}
    if len(rows) != 1:
        raise ConfigError(f"recycle inputs must have one row count, got {sorted(rows)}")
    training = model.training
    handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
    model.eval()
    try:
        for first in range(0, rows.pop(), batch_size):
            try:
                model(**{k: v[first:first + batch_size] for k, v in inputs.items()})
            except _Reached:
                pass
    finally:
        handle.remove()
        model.train(training)
    return torch.cat(found), Recycled(model, start)
