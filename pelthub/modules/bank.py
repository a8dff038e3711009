"""A bank: T rows of plain modules (one row per task, or per module set) served per example.

Row t is a {kind: module} dict (a kind a row lacks is the identity for its examples). The bank
installs one hook per adapted site and kind, whatever T is; each hook asks `route(batch)` which row
every example runs (None: the bank stands aside for this call) and calls a kernel of `grouped.py`. The rows stay ordinary modules, stacked per
call when a batch mixes tasks (`torch.stack`, one copy of the T rows' tensors per site, and
differentiable, so training reaches each row's own parameters and nothing else); a batch of one task
uses that row's tensors as they are.

Kinds: LoRA, IA3, bottleneck and Compacter adapters (any placement), LN-tuning. Prompts and prefixes
change the input length, so a bank refuses them; `PerTask` serves them beside its bank.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError, RoutingError, UnsupportedModelError
from .base import CallContext, Handle, PeltModule, site_key, site_name
from .grouped import RoutePlan, affine_rows, lora_into, mlp_into, scale_rows

SELECTABLE = ("lora", "ia3", "bottleneck", "compacter", "ln")
Rows = Sequence[Mapping[str, PeltModule]]


class Bank:
    """Per-example selection over `rows`; `route(batch)` gives the call's plan (built once per call) or None."""

    def __init__(self, rows: Rows, route: Callable[[int], RoutePlan | None], what: str):
        self.rows, self._route, self.what = [dict(r) for r in rows], route, what
        self.ctx: CallContext | None = None  # set by install
        self.kinds = list(dict.fromkeys(k for r in self.rows for k in r))
        bad = [k for k in self.kinds if k not in SELECTABLE]
        if bad:
            raise RoutingError(f"{what} selects among {list(SELECTABLE)} modules per example, not {bad}: prompts "
                               "and prefixes change the input length; PerTask(..., tasks=) with task_ids= runs one per example")
        for r in self.rows:
            mine = [k for k in self.kinds if k in r]
            if mine != list(r):
                raise ConfigError(f"{what}: every row must list its kinds in one order ({self.kinds}), one lists "
                                  f"{list(r)}; build the module sets with the kinds in the same order")

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        self.ctx = ctx
        return [h for kind in self.kinds for h in _INSTALL[kind](self, base, ctx)]

    def route(self, batch: int) -> RoutePlan | None:
        """This call's plan, or None where the bank stands aside (the call does not route, or is bare)."""
        return None if self.ctx.bare else self._route(batch)

    def present(self, kind: str, key: str, part: Callable[[PeltModule], Any]) -> list[Any]:
        """Per row: `part(module)` when the row's `kind` module adapts `key`, else None."""
        out = []
        for r in self.rows:
            m = r.get(kind)
            out.append(part(m) if m is not None and _has(m, key) else None)
        return out


def _has(module: PeltModule, key: str) -> bool:
    for attr in ("layers", "scales"):
        if hasattr(module, attr):
            return key in getattr(module, attr)
    return any(k.rsplit("--", 1)[0] == key for k in module.deltas)


def _one(values: set[Any], what: str, field: str) -> Any:
    if len(values) > 1:
        raise ConfigError(f"{what}: the modules selected at one site must share {field}, got {sorted(map(str, values))}")
    return next(iter(values))


# ----- LoRA -----

def _install_lora(bank: Bank, base: nn.Module, ctx: CallContext) -> list[Handle]:
    keys = dict.fromkeys(k for r in bank.rows if "lora" in r for k in r["lora"].layers)
    handles = []
    for key in keys:
        layers = bank.present("lora", key, lambda m, key=key: m.layers[key])
        real = [l for l in layers if l is not None]
        dropout = real[0].dropout
        _one({getattr(l.dropout, "p", 0.0) for l in real}, bank.what, "one LoRA dropout")
        handles.append(base.get_submodule(site_name(key)).register_forward_hook(
            _lora_hook(bank, layers, dropout)))
    return handles


def _lora_hook(bank: Bank, layers: list[Any], dropout: nn.Module) -> Callable[..., torch.Tensor]:
    rank = max(l.lora_a.shape[0] for l in layers if l is not None)
    scales = [l.scale if l is not None else 0.0 for l in layers]
    uniform = len({s for s, l in zip(scales, layers) if l is not None}) == 1
    template = next(l for l in layers if l is not None)

    def rows(t: int | None) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        if t is not None:
            l = layers[t]
            return None if l is None else (l.lora_a, l.lora_b, l.scale)
        # stacked as (T, r, in), (T, out, r), contiguous: the gather's backward then adds whole rows
        a = torch.stack([_pad_rank(l.lora_a if l is not None else template.lora_a.new_zeros(rank, template.lora_a.shape[1]),
                                   rank, 0) for l in layers])
        b = torch.stack([_pad_rank(l.lora_b if l is not None else template.lora_b.new_zeros(template.lora_b.shape[0], rank),
                                   rank, 1) for l in layers])
        if uniform:
            return a, b, template.scale
        return a, b * b.new_tensor(scales)[:, None, None], 1.0

    def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        route = bank.route(out.shape[0])
        if route is None:
            return out
        return lora_into(out, dropout(args[0].to(template.lora_a.dtype)), route, rows)
    return hook


def _pad_rank(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    missing = rank - t.shape[dim]
    if not missing:
        return t
    return F.pad(t, (0, 0, 0, missing) if dim == 0 else (0, missing))


# ----- IA3 -----

def _install_ia3(bank: Bank, base: nn.Module, ctx: CallContext) -> list[Handle]:
    keys = dict.fromkeys(k for r in bank.rows if "ia3" in r for k in r["ia3"].scales)
    handles = []
    for key in keys:
        on_input = _one({r["ia3"].on_input[key] for r in bank.rows if "ia3" in r and key in r["ia3"].scales},
                        bank.what, f"which side of {site_name(key)} IA3 scales")

        def stack(key: str = key) -> torch.Tensor:  # read per call: FSDP swaps the Parameter objects
            scales = bank.present("ia3", key, lambda m: m.scales[key])
            like = next(s for s in scales if s is not None)
            return torch.stack([s if s is not None else torch.ones_like(like) for s in scales])

        module = base.get_submodule(site_name(key))
        if on_input:
            def pre(_m: nn.Module, args: tuple, stack: Callable = stack) -> tuple:
                x, route = args[0], bank.route(args[0].shape[0])
                return None if route is None else (scale_rows(x, route, stack), *args[1:])
            handles.append(module.register_forward_pre_hook(pre))
        else:
            def post(_m: nn.Module, _args: tuple, out: torch.Tensor, stack: Callable = stack) -> torch.Tensor:
                route = bank.route(out.shape[0])
                return out if route is None else scale_rows(out, route, stack)
            handles.append(module.register_forward_hook(post))
    return handles


# ----- bottleneck and Compacter adapters -----

def _adapter_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """D (in, k), d (k), U (k, out), u (out) of a bottleneck or Compacter layer, its scale folded into U, u."""
    if hasattr(layer, "scale"):  # AdapterLayer
        return layer.down.weight.T, layer.down.bias, layer.up.weight.T * layer.scale, layer.up.bias * layer.scale
    return layer.down.weight(), layer.down.bias, layer.up.weight(), layer.up.bias


def _install_adapters(kind: str) -> Callable[[Bank, nn.Module, CallContext], list[Handle]]:
    def install(bank: Bank, base: nn.Module, ctx: CallContext) -> list[Handle]:
        pairs = dict.fromkeys((src, dst, r[kind].config.placement == "parallel")
                              for r in bank.rows if kind in r for src, dst in r[kind].pairs)
        handles = []
        for src, dst, parallel in pairs:
            key = site_key(dst)
            layers = bank.present(kind, key, lambda m, key=key: m.layers[key])
            act = _one({type(l.act) for l in layers if l is not None}, bank.what, f"one {kind} activation")()
            handles += _adapter_hooks(bank, ctx, base, src, dst, parallel, layers, act)
        return handles
    return install


def _adapter_hooks(bank: Bank, ctx: CallContext, base: nn.Module, src: str, dst: str, parallel: bool,
                   layers: list[Any], act: nn.Module) -> list[Handle]:
    def weights() -> tuple[torch.Tensor, ...]:
        found = [_adapter_weights(l) if l is not None else None for l in layers]
        k = max(w[0].shape[1] for w in found if w is not None)
        like = next(w for w in found if w is not None)
        d_in, d_out = like[0].shape[0], like[2].shape[1]
        zero = (like[0].new_zeros(d_in, k), like[0].new_zeros(k), like[0].new_zeros(k, d_out), like[0].new_zeros(d_out))
        found = [zero if w is None else (F.pad(w[0], (0, k - w[0].shape[1])), F.pad(w[1], (0, k - w[1].shape[0])),
                                         F.pad(w[2], (0, 0, 0, k - w[2].shape[0])), w[3]) for w in found]
        return tuple(torch.stack(part) for part in zip(*found))

    out_module = base.get_submodule(dst)
    if not parallel or src == dst:
        def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            route = bank.route(out.shape[0])
            return out if route is None else mlp_into(out, args[0] if parallel else out, route, act, weights)
        return [out_module.register_forward_hook(hook)]

    def keep(_m: nn.Module, args: tuple) -> None:  # the FFN input, for the hook on its output module
        ctx.scratch(bank)[dst] = args[0]

    def add(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        x, route = ctx.scratch(bank).pop(dst, None), bank.route(out.shape[0])
        return out if route is None or x is None else mlp_into(out, x, route, act, weights)
    return [base.get_submodule(src).register_forward_pre_hook(keep), out_module.register_forward_hook(add)]


# ----- LN-tuning -----

def _install_ln(bank: Bank, base: nn.Module, ctx: CallContext) -> list[Handle]:
    keys = dict.fromkeys(k.rsplit("--", 1)[0] for r in bank.rows if "ln" in r for k in r["ln"].deltas)
    handles = []
    for key in keys:
        module = base.get_submodule(site_name(key))
        normalise = _normaliser(module)

        def deltas(key: str = key) -> tuple:  # read per call: FSDP swaps the Parameter objects
            gammas = bank.present("ln", key, lambda m: m.deltas[f"{key}--weight"])
            betas = bank.present("ln", key, lambda m: m.deltas.get(f"{key}--bias"))
            like = next(g for g in gammas if g is not None)
            return (torch.stack([g if g is not None else torch.zeros_like(like) for g in gammas]),
                    torch.stack([b if b is not None else torch.zeros_like(like) for b in betas]))

        def hook(_m: nn.Module, args: tuple, out: torch.Tensor, deltas: Callable = deltas,
                 normalise: Callable = normalise) -> torch.Tensor:
            route = bank.route(out.shape[0])
            return out if route is None else affine_rows(out, normalise(args[0]), route, deltas)
        handles.append(module.register_forward_hook(hook))
    return handles


def _normaliser(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """x ↦ the norm's output before its gain and bias: LayerNorm, or an RMSNorm with `variance_epsilon`."""
    if isinstance(getattr(module, "normalized_shape", None), tuple) and hasattr(module, "eps"):
        return lambda x: F.layer_norm(x.float(), module.normalized_shape, eps=module.eps)
    if hasattr(module, "variance_epsilon"):
        return lambda x: x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    raise UnsupportedModelError(f"per-example LN-tuning needs a LayerNorm or an RMSNorm with variance_epsilon; "
                                f"{type(module).__name__} is neither")


_INSTALL: dict[str, Callable[[Bank, nn.Module, CallContext], list[Handle]]] = {
    "lora": _install_lora, "ia3": _install_ia3, "bottleneck": _install_adapters("bottleneck"),
    "compacter": _install_adapters("compacter"), "ln": _install_ln,
}
