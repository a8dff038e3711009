"""Poly to plain LoRA: one task's routed adapter as one LoRA, and the routing matrix as a heatmap.

A task's routed update is ΔW_t = (α/r) · Ā_t B̄_t with Ā_t ∈ R^{in×r} (heads stacked along the
input) and B̄_t ∈ R^{r×out} (heads side by side along the output): a rank-r LoRA with
A = Ā_tᵀ, B = B̄_tᵀ and the same α/r, for any number of heads (the converse, LoRAs as skills,
is poly_sources.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError
from ..model import ModularModel, attach
from ..modules.base import site_key, site_name
from ..modules.lora import LoRA
from .poly import poly_module
from .poly_sources import LoRAWeights

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@torch.no_grad()
def task_lora_state(model: nn.Module, task: str | int) -> tuple[LoRA, LoRAWeights]:
    """One task's routed adapter as a plain LoRA: its config and {site: (A (r, in), B (out, r))}.

    Exact for every variant and any number of heads (eval routing, no noise).
    """
    module = poly_module(model)
    c = module.config
    ids = torch.tensor([module.task_index(task)], device=next(module.parameters()).device)
    weights: LoRAWeights = {}
    for key, layer in module.layers.items():
        a, b = layer.mixed(module.mixing(key, ids).to(layer.lora_a.dtype))
        weights[site_name(key)] = (a[0].T.contiguous(), b[0].T.contiguous())
    return LoRA(r=c.rank, alpha=c.alpha, dropout=c.dropout, targets=tuple(weights)), weights


@torch.no_grad()
def export_task_lora(model: ModularModel, task: str | int, base: nn.Module | None = None,
                     name: str | None = None) -> ModularModel:
    """A new model with one task's routed adapter as a plain LoRA (and the trained task head, if any).

    base: a second copy of the base model to attach to; None rebuilds one from `model.base`'s
    config and weights. The result saves to the registry and converts to PEFT like any LoRA.
    """
    module = poly_module(model)
    config, weights = task_lora_state(module, task)
    base = _fresh_copy(model.base) if base is None else base
    if base is model.base:
        raise ConfigError("export_task_lora: base= is the routed model's own base (its Poly hooks are on it); "
                          "pass another copy of the base model, or leave base=None")
    task_name = module.config.tasks[module.task_index(task)]
    name = name or task_name.replace(".", "-").replace("/", "-")
    heads = [(k, h) for hs in model.heads.values() for k, h in hs.items()]
    exported = attach(base, config, name=name, head=site_name(heads[0][0]) if heads else False)
    for site, (a, b) in weights.items():
        layer = exported.adapters[name]["lora"].layers[site_key(site)]
        layer.lora_a.copy_(a)
        layer.lora_b.copy_(b)
    if heads:
        exported.heads[name][heads[0][0]].load_state_dict(heads[0][1].state_dict())
    return exported


def _fresh_copy(base: nn.Module) -> nn.Module:
    """The base model rebuilt from its config and weights, without any hooks on it."""
    copy = type(base)(base.config).to(device=base.device, dtype=base.dtype)
    copy.load_state_dict(base.state_dict())
    return copy.train(base.training)


def plot_routing(model: nn.Module, layer: str | int | None = None, ax: Any = None) -> "Figure":
    """Heatmap of the eval routing weights: tasks × (head, skill), for one layer or the mean of all.

    Needs matplotlib (`pip install pelthub[plot]`).
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot_routing needs matplotlib: pip install 'pelthub[plot]'") from None
    module = poly_module(model)
    weights = module.routing_weights()
    if layer is None:
        matrix, title = torch.stack(list(weights.values())).mean(0), f"mean over {len(weights)} layers"
    else:
        title = list(weights)[layer] if isinstance(layer, int) else layer
        if title not in weights:
            raise ConfigError(f"plot_routing: no adapted layer {layer!r}; layers: {list(weights)[:6]}...")
        matrix = weights[title]
    c = module.config
    if ax is None:
        _, ax = plt.subplots(figsize=(1.5 + 0.35 * c.heads * c.skills, 1.0 + 0.35 * len(c.tasks)))
    image = ax.imshow(matrix.reshape(len(c.tasks), -1).numpy(), aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_yticks(range(len(c.tasks)), labels=list(c.tasks))
    ax.set_xlabel("skill" if c.heads == 1 else f"head × skill ({c.heads} × {c.skills})")
    ax.set_title(title)
    ax.figure.colorbar(image, ax=ax, label="routing weight")
    return ax.figure

