"""The small protocol every module kind follows.

A module kind is a frozen config (`ModuleConfig`) that builds a `PeltModule`:
an ordinary `nn.Module` holding the trainable tensors, plus how it reaches the
base model. It reaches it in one or more of three ways:

- `install(base)`: forward hooks or parametrisations on named sites
  (LoRA, adapters, IA3, LN-tuning); returns handles so detaching is exact;
- `prompt(embeds, mask, ctx)`: embeddings prepended to the input (soft prompts);
- `prefix(batch, ctx)`: per-layer key/value pairs fed as `past_key_values`.

`CallContext` carries the per-forward facts hooks may need (task ids, the
attention mask); the wrapped model sets it for the duration of one call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import nn


@dataclass
class CallContext:
    """Per-call inputs that hooks read; owned by one ModularModel, reset after each call."""

    task_ids: torch.Tensor | None = None        # (B,) int64
    attention_mask: torch.Tensor | None = None  # (B, n) of the real tokens

    def task_ids_for(self, batch: int) -> torch.Tensor | None:
        """Task ids matching a batch size; repeated per beam/sample when generation widened it."""
        ids = self.task_ids
        if ids is None or ids.shape[0] == batch:
            return ids
        if batch % ids.shape[0] == 0:
            return ids.repeat_interleave(batch // ids.shape[0])
        raise ValueError(f"batch of {batch} does not match {ids.shape[0]} task ids")


class Handle(Protocol):
    def remove(self) -> None: ...


class PeltModule(nn.Module):
    """Base of the built form of every module kind."""

    config: Any

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        """Attach hooks/parametrisations to `base`; the default attaches nothing."""
        return []

    def prompt(self, embeds: torch.Tensor, mask: torch.Tensor | None, ctx: CallContext) -> torch.Tensor | None:
        """Embeddings (B, L, d) to prepend to the input, or None."""
        return None

    def prefix(self, batch: int, ctx: CallContext) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per-layer (key, value) pairs (B, heads, L, head_dim), or None."""
        return None

    def merge_into(self, base: nn.Module) -> None:
        """Fold this module into the base weights (only for kinds where that is exact)."""
        from ..errors import ConfigError
        raise ConfigError(f"{self.config.kind} modules cannot be merged into the base weights; "
                          "merge_and_unload supports lora, ia3 and ln")


def site_key(name: str) -> str:
    """A module name as an nn.ModuleDict key (which may not contain dots)."""
    return name.replace(".", "-")


def site_name(key: str) -> str:
    return key.replace("-", ".")


def add_to_output(module: nn.Module, delta: Callable[[torch.Tensor], torch.Tensor]) -> Handle:
    """Hook: module(x) becomes module(x) + delta(x)."""
    def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + delta(args[0]).to(out.dtype)
    return module.register_forward_hook(hook)


def map_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Handle:
    """Hook: module(x) becomes fn(module(x))."""
    def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return fn(out)
    return module.register_forward_hook(hook)


def map_input(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Handle:
    """Pre-hook: module(x) becomes module(fn(x))."""
    def hook(_m: nn.Module, args: tuple) -> tuple:
        return (fn(args[0]), *args[1:])
    return module.register_forward_pre_hook(hook)


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"
