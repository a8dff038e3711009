"""`adapter_names=` (PEFT's name) and `set_adapter`: one of the model's plain module sets per example.

`model(**batch, adapter_names=["a", "b", "__base__", ...])` runs example i with the set named
adapter_names[i] alone ("__base__": none); `model.set_adapter("a")` makes every later call run set
"a" alone, `set_adapter(None)` goes back to every set at once (the default, `Stack`).

While a call selects, every plain set's hooks step aside (`CallContext.selecting`) and one bank over
all sets (`pelthub.modules.bank`) serves the examples. The bank is built on first use and rebuilt
when the sets change (added, removed, reloaded); it holds no copies, so training the sets, loading
weights or `.to()` are seen at once.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import RoutingError
from ..modules.bank import Bank
from ..modules.base import Handle
from ..modules.grouped import RoutePlan, as_ids, plan_once

if TYPE_CHECKING:
    from .modular import ModularModel

BASE = "__base__"


@dataclass
class Selection:
    """The bank over a model's sets, the sets it was built for, and the active set of `set_adapter`.

    Made with the model, never on first use: the lock is what lets two threads' first `adapter_names`
    calls build the bank once between them (both installing it would leave one's hooks unrecorded,
    so every later call and `detach()` would run them too).
    """

    key: tuple = ()
    names: list[str] = field(default_factory=list)
    handles: list[Handle] = field(default_factory=list)
    active: str | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)


def set_adapter(model: "ModularModel", name: str | None) -> None:
    """Run set `name` alone from now on (None: every set at once again)."""
    if name is not None and name != BASE and name not in model.adapters:
        raise RoutingError(f"no module set {name!r}; sets: {list(model.adapters)} (or {BASE!r}, or None for all)")
    model.selection.active = name


def selected_ids(model: "ModularModel", adapter_names: Any, batch: int) -> torch.Tensor | None:
    """The set index of every example for this call, or None when the call does not select.

    Indices (a tensor or ints) are the sets in order, then the base; floats and bools are refused.
    """
    if adapter_names is None:
        adapter_names = model.selection.active
        if adapter_names is None:
            return None
    names = [*_ensure_bank(model), BASE]
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names] * batch
    ids = as_ids(adapter_names, len(names), "module sets in adapter_names", names)
    if ids.shape[0] != batch:
        raise RoutingError(f"adapter_names names {ids.shape[0]} sets for a batch of {batch}; name one per example")
    return ids.to(model.device)


def _ensure_bank(model: "ModularModel") -> list[str]:
    """(Re)build the bank when the model's sets are not the ones it serves; the names of the sets it serves.

    Checked once without the lock (the bank is built: every call after the first), then again under it.
    """
    selection = model.selection
    key = tuple((name, tuple(id(m) for m in s.values())) for name, s in model.adapters.items())
    if key == selection.key:
        return selection.names
    with selection.lock:
        if key != selection.key:
            release(model)
            rows = [dict(s) for s in model.adapters.values()] + [{}]   # the last row is "__base__"
            bank = Bank(rows, lambda batch: _route(model, batch), "adapter_names")
            selection.handles, selection.names = bank.install(model.base, model.ctx), list(model.adapters)
            selection.key = key  # last: a call that sees the key finds the handles and names set
        return selection.names


def _route(model: "ModularModel", batch: int) -> RoutePlan | None:
    state = model.ctx.current()
    if state is None or state.selected is None:
        return None

    def ids(b: int) -> torch.Tensor:
        chosen = state.selected
        return chosen if chosen.shape[0] == b else chosen.repeat_interleave(b // chosen.shape[0])
    return plan_once(model.ctx, model.selection, batch, ids)


def release(model: "ModularModel") -> None:
    """Remove the bank's hooks (detach, or before rebuilding it)."""
    selection = model.selection
    with selection.lock:
        for handle in reversed(selection.handles):
            handle.remove()
        selection.handles, selection.names, selection.key = [], [], ()
