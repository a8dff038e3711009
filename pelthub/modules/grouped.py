"""Kernels that run each example of a batch through its own task's module, one call per site.

Every kernel takes the call's `RoutePlan` and picks one of two paths:

- single: every example has the same task. That task's tensors alone, exactly the cost of the plain
  module (the update is fused into the output by `addmm`, no per-example copies).
- gathered: each example gathers its task's tensors (`index_select`, b × (in·r + r·out) values for a
  LoRA) and one batched matmul runs all examples at once, the add fused into it (`baddbmm`). The
  FLOPs are the plain module's; the gathers are small next to the activations for any r ≪ d.

Grouping by task (sort, one matmul per group, scatter back) does the same FLOPs with larger matmuls,
but in plain PyTorch it copies the activations twice (sort, scatter), needs the group sizes on the host
(a sync, and under torch.compile a new shape per batch composition) and loops over the groups present.
Measured on one 384 → 1536 site with 16 tasks (`python -m benchmarks.grouped --only kernels`, 2 cores
under load): gathered 1.17× the base linear at 64×64 and 1.89× at 256×1 (decoding), grouped 8.1× and
8.0×, the one-task path 1.13× and 2.3×. So the gathered path is the multi-task path at every shape here;
a segment kernel (Punica's SGMV) would be the next step on accelerators.

`RoutePlan.single` is found on the host once per call (`plan`): free for CPU tensors, one sync on an
accelerator, skipped under torch.compile so that one graph serves every batch composition.
"""
from __future__ import annotations

import numbers
import reprlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import RoutingError
from .base import CallContext


@dataclass(frozen=True)
class RoutePlan:
    """Which task each example runs: ids (b,) on the modules' device; `single` when they are all one task."""

    ids: torch.Tensor
    single: int | None


def as_ids(given: Any, count: int | None, what: str, names: Sequence[str] = ()) -> torch.Tensor:
    """`given` as int64 ids in [0, count): a 1-D integer tensor, or a list of ints and of `names`.

    Floats and bools are refused, never cast: `.long()` and `int()` would run id 1.9 as 1 and True as 1,
    sending examples through another task's modules without a word. count None: the caller knows no
    upper bound, so only negative ids are refused.
    """
    allowed = f"integers in [0, {count})" if count is not None else "integers >= 0"
    allowed += f" or names from {list(names)}" if names else ""
    if isinstance(given, np.ndarray):
        given = given.tolist()
    if isinstance(given, torch.Tensor):
        if given.dim() != 1 or given.dtype == torch.bool or given.dtype.is_floating_point or given.dtype.is_complex:
            raise RoutingError(f"{what} must be {allowed}, one per example: pass a list or a 1-D integer tensor, "
                               f"not a {given.dtype} tensor of shape {tuple(given.shape)}")
        ids = given.long()
        outside = ids[(ids < 0) | (ids >= count)] if count is not None else ids[ids < 0]
        if outside.numel():
            raise RoutingError(f"{what} must be {allowed}, got {outside[:3].tolist()}")
        return ids
    if not isinstance(given, (list, tuple)):
        raise RoutingError(f"{what} must be {allowed}, one per example in a list or a 1-D integer tensor; "
                           f"got {reprlib.repr(given)}")
    lookup = {name: i for i, name in enumerate(names)}
    for value in given:
        if isinstance(value, str) and value not in lookup:
            raise RoutingError(f"unknown {what}: {reprlib.repr(value)}; give {allowed}")
        integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not isinstance(value, str) and not (integer and 0 <= value < (2 ** 63 if count is None else count)):
            raise RoutingError(f"{what} must be {allowed}, got {reprlib.repr(value)}")
    return torch.tensor([lookup[v] if isinstance(v, str) else int(v) for v in given], dtype=torch.long)


def plan(ids: torch.Tensor) -> RoutePlan:
    """The plan of one call's task ids; build it once per call (it reads the ids on the host)."""
    if torch.compiler.is_compiling() or ids.numel() == 0:
        return RoutePlan(ids, None)
    first = int(ids[0])
    return RoutePlan(ids, first if bool((ids == first).all()) else None)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(b, …, d) as (b, tokens, d)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _in_place(out: torch.Tensor) -> bool:
    """Add into the layer's fresh output when autograd is off: no new activation-sized buffer per site
    (a fresh one is page-faulted in on every call)."""
    return not torch.is_grad_enabled() and out.is_contiguous() and not torch.compiler.is_compiling()


def _add_into(out: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    delta = delta.view(out.shape).to(out.dtype)
    return out.add_(delta) if _in_place(out) else out + delta


def lora_single(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """out + scale·x·aᵀ·bᵀ for one (a (r, in), b (out, r)) shared by the whole batch.

    a and b are in nn.Linear's weight layout (rows = outputs): x·aᵀ then reads each row of a along
    x's contiguous rows, about twice as fast at r ≪ in as a (in, r) matrix (measured on CPU).
    """
    flat = x.reshape(-1, x.shape[-1]) @ a.T
    if out.dtype != a.dtype:
        return out + (flat @ b.T * scale).view(out.shape).to(out.dtype)
    if _in_place(out):
        out.view(-1, out.shape[-1]).addmm_(flat, b.T, alpha=scale)
        return out
    return torch.addmm(out.reshape(-1, out.shape[-1]), flat, b.T, alpha=scale).view(out.shape)


def lora_rows(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """out + scale·x_i·a_iᵀ·b_iᵀ per example i, for gathered a (b, r, in) and b (b, out, r)."""
    h = _as_rows(x).bmm(a.transpose(1, 2))
    if out.dtype != a.dtype:
        return out + (h.bmm(b.transpose(1, 2)) * scale).view(out.shape).to(out.dtype)
    if _in_place(out):
        _as_rows(out).baddbmm_(h, b.transpose(1, 2), alpha=scale)
        return out
    return torch.baddbmm(_as_rows(out), h, b.transpose(1, 2), alpha=scale).view(out.shape)


def lora_into(out: torch.Tensor, x: torch.Tensor, route: RoutePlan,
              rows: Callable[[int | None], tuple[torch.Tensor, torch.Tensor, float] | None]) -> torch.Tensor:
    """out + scale·x·A_tᵀ·B_tᵀ with t each example's task.

    rows(t) gives task t's (A (r, in), B (out, r), scale), or None where t adds nothing; rows(None) the
    stacks (A (T, r, in), B (T, out, r), scale) of every task. The single path never builds the stacks.
    """
    if route.single is not None:
        found = rows(route.single)
        return out if found is None else lora_single(out, x, *found)
    a, b, scale = rows(None)
    return lora_rows(out, x, a.index_select(0, route.ids), b.index_select(0, route.ids), scale)


def scale_rows(t: torch.Tensor, route: RoutePlan, scales: Callable[[], torch.Tensor]) -> torch.Tensor:
    """t ⊙ s_t per example, scales() (T, d) (IA3)."""
    s = scales()
    if route.single is not None:
        return t * s[route.single].to(t.dtype)
    picked = s.index_select(0, route.ids).to(t.dtype)
    return t * picked.view(t.shape[0], *([1] * (t.dim() - 2)), t.shape[-1])


def mlp_into(out: torch.Tensor, x: torch.Tensor, route: RoutePlan, act: nn.Module,
             weights: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """out + act(x·D_t + d_t)·U_t + u_t per example: weights() = D (T, in, k), d (T, k), U (T, k, out), u (T, out)."""
    down, down_bias, up, up_bias = weights()
    x = x.to(down.dtype)
    if route.single is not None:
        t = route.single
        h = act(torch.addmm(down_bias[t], x.reshape(-1, x.shape[-1]), down[t]))
        return _add_into(out, torch.addmm(up_bias[t], h, up[t]))
    ids = route.ids
    h = act(torch.baddbmm(down_bias.index_select(0, ids)[:, None], _as_rows(x), down.index_select(0, ids)))
    return _add_into(out, torch.baddbmm(up_bias.index_select(0, ids)[:, None], h, up.index_select(0, ids)))


def affine_rows(out: torch.Tensor, normed: torch.Tensor, route: RoutePlan,
                deltas: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """out + n(x) ⊙ Δγ_t + Δβ_t per example (LN-tuning), deltas() = Δγ (T, d), Δβ (T, d)."""
    gamma, beta = deltas()
    if route.single is not None:
        t = route.single
        return _add_into(out, normed * gamma[t] + beta[t])
    shape = (out.shape[0], *([1] * (out.dim() - 2)), out.shape[-1])
    g, b = gamma.index_select(0, route.ids).view(shape), beta.index_select(0, route.ids).view(shape)
    return _add_into(out, normed * g + b)


def plan_once(ctx: CallContext, owner: object, batch: int,
              ids: Callable[[int], torch.Tensor | None]) -> RoutePlan | None:
    """The plan of `owner` for this call and batch size, built on first use (every site reuses it)."""
    scratch = ctx.scratch(owner)
    key = ("plan", batch)
    if key not in scratch:
        found = ids(batch)
        scratch[key] = None if found is None else plan(found)
    return scratch[key]
