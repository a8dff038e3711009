"""The small protocol every module kind follows.

A module kind is a frozen config (`ModuleConfig`) that builds a `PeltModule`:
an ordinary `nn.Module` holding the trainable tensors, plus how it reaches the
base model. It reaches it in one or more of three ways:

- `install(base)`: forward hooks or parametrisations on named sites
  (LoRA, adapters, IA3, LN-tuning); returns handles so detaching is exact;
- `prompt(embeds, mask, ctx)`: embeddings prepended to the input (soft prompts);
- `prefix(batch, ctx)`: per-layer key/value pairs fed as `past_key_values`.

`CallContext` carries the per-forward facts hooks may need (task ids, the
attention mask, the prefix cache) as a `CallState` bound for one call.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn


@dataclass
class CallState:
    """What one forward (or generate) call tells the hooks: built fresh per call, never shared.

    `scratch` holds per-call facts a module computes once and reuses across its
    hooks (keyed by `id(module)`), so no module keeps per-call state on itself.
    """

    task_ids: torch.Tensor | None = None        # (B,) int64
    attention_mask: torch.Tensor | None = None  # (B, n) of the real tokens
    cache: Any = None                           # the prefix cache pelthub built for this call, if any
    selected: torch.Tensor | None = None        # (B,) module set per example (`adapter_names=`), if selecting
    bare: bool = False                          # inside `disable_adapter`: every module steps aside
    scratch: dict[int, dict[str, Any]] = field(default_factory=dict)


class CallContext:
    """Where a model's hooks find the state of the call they run in.

    The state lives in a `contextvars.ContextVar`, set for the duration of one
    call: two threads calling the same model, or the model called inside its own
    forward (a teacher sharing the base), each see their own state. Gradient
    checkpointing re-enters the captured state for the recomputed forward (see
    `ModularModel.gradient_checkpointing_enable`).
    """

    def __init__(self) -> None:
        self._var: ContextVar[CallState | None] = ContextVar(f"pelthub_call_{id(self):x}", default=None)
        self._traced: CallState | None = None  # set only while dynamo traces `run` (see there)

    def current(self) -> CallState | None:
        if torch.compiler.is_compiling() and self._traced is not None:
            return self._traced
        return self._var.get()

    def run(self, state: CallState, fn: Callable[[], Any]) -> Any:
        """fn() for a call already bound to `state` (`bound`), with the state visible to torch.compile.

        dynamo cannot trace `ContextVar.get` (a graph break in every hook that reads it), so while it
        traces this function the state is also put in `_traced`, where the hooks it inlines read it:
        dynamo follows that to `state`, an argument of this frame, so the compiled graph takes the
        call's tensors (task ids, masks) as graph inputs and guards on its flags (new task ids of one
        shape compile nothing). Run eagerly, and in every run of the compiled graph, nothing is
        written: the hooks read the ContextVar, and threads never see each other's state. After a
        graph break inside fn, dynamo resumes outside this frame, where `_traced` is None and the
        hooks read the ContextVar (a break per hook, still correct).
        """
        if not torch.compiler.is_compiling():
            return fn()
        self._traced = state
        try:
            return fn()
        finally:
            self._traced = None

    @contextmanager
    def bound(self, state: CallState) -> Iterator[CallState]:
        token = self._var.set(state)
        try:
            yield state
        finally:
            self._var.reset(token)

    @property
    def task_ids(self) -> torch.Tensor | None:
        state = self.current()
        return None if state is None else state.task_ids

    @property
    def attention_mask(self) -> torch.Tensor | None:
        state = self.current()
        return None if state is None else state.attention_mask

    @property
    def selecting(self) -> bool:
        """Whether plain sets' hooks step aside: this call selects one module set per example (a bank
        serves it), or runs the bare base (`bare`)."""
        state = self.current()
        return state is not None and (state.selected is not None or state.bare)

    @property
    def bare(self) -> bool:
        """Whether this call runs the bare base (`ModularModel.disable_adapter`): every hook steps aside."""
        state = self.current()
        return state is not None and state.bare

    def scratch(self, owner: object) -> dict[str, Any]:
        """The per-call scratch dict of `owner`; a throwaway dict when no call is bound."""
        state = self.current()
        return {} if state is None else state.scratch.setdefault(id(owner), {})

    def task_ids_for(self, batch: int) -> torch.Tensor | None:
        """Task ids matching a batch size; repeated per beam/sample when generation widened it."""
        ids = self.task_ids
        if ids is None or ids.shape[0] == batch:
            return ids
        if batch % ids.shape[0] == 0:
            return ids.repeat_interleave(batch // ids.shape[0])
        from ..errors import RoutingError
        raise RoutingError(f"a batch of {batch} does not match the {ids.shape[0]} task ids of this call")


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

    def provides(self, method: str) -> bool:
        """Whether this module offers one of the optional capabilities above (`prompt`, `prefix`, ...):
        by default, whether its kind overrides the method; a container kind answers by what it holds."""
        return getattr(type(self), method) is not getattr(PeltModule, method)

    def reads_call_state(self) -> bool:
        """Overridden (to return True) by kinds whose hooks read the call state inside the layers."""
        return False

    def check_call(self, state: CallState) -> None:
        """After the base forward: raise if a hook this call needed did not run (overridden where it matters)."""

    def check_merge(self, base: nn.Module) -> None:
        """Raise if `merge_into(base)` would fail on this base: called on every module before any merges."""

    def merge_into(self, base: nn.Module) -> None:
        """Fold this module into the base weights (only for kinds where that is exact)."""
        from ..errors import ConfigError
        raise ConfigError(f"{self.config.kind} modules cannot be merged into the base weights; "
                          "merge_and_unload supports lora, ia3, ln, dsee and kadaptation")


def site_key(name: str) -> str:
    """A module name as an nn.ModuleDict key (which may not contain dots)."""
    return name.replace(".", "-")


def site_name(key: str) -> str:
    return key.replace("-", ".")


def add_to_output(module: nn.Module, delta: Callable[[torch.Tensor], torch.Tensor],
                  ctx: CallContext | None = None) -> Handle:
    """Hook: module(x) becomes module(x) + delta(x); a plain set's hook (ctx given) steps aside while selecting."""
    return fuse_into_output(module, lambda out, x: out + delta(x).to(out.dtype), ctx)


def fuse_into_output(module: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     ctx: CallContext | None = None) -> Handle:
    """Hook: module(x) becomes fn(module(x), x), for updates that fuse their add into the output
    (`modules.grouped`); a plain set's hook (ctx given) steps aside while selecting."""
    def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out if ctx is not None and ctx.selecting else fn(out, args[0])
    return module.register_forward_hook(hook)


def map_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], ctx: CallContext | None = None) -> Handle:
    """Hook: module(x) becomes fn(module(x)); steps aside while selecting (see `add_to_output`)."""
    def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out if ctx is not None and ctx.selecting else fn(out)
    return module.register_forward_hook(hook)


def map_input(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], ctx: CallContext | None = None) -> Handle:
    """Pre-hook: module(x) becomes module(fn(x)); steps aside while selecting (see `add_to_output`)."""
    def hook(_m: nn.Module, args: tuple) -> tuple | None:
        if ctx is not None and ctx.selecting:
            return None
        return (fn(args[0]), *args[1:])
    return module.register_forward_pre_hook(hook)


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"
