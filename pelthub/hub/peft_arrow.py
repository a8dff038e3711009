"""An Arrow model in PEFT's format: its sources as PEFT LoRA folders plus the ArrowConfig fields.

    export_arrow_peft(model, "out/")   # out/task_0, out/task_1, ... and out/arrow_config.json
    create_arrow_model(base, [f"out/task_{i}" for i in range(n)],
                       ArrowConfig(**json.load(open("out/arrow_config.json"))))

Each source is written with its scale folded into B (lora_alpha = r), and after GenKnowSub when
the Arrow model used `gks` (so `use_gks` is false in the export and the routing is the same).
PEFT's Arrow has one rank and one set of adapted modules for all sources, and places its router
on every module whose last name a source adapts; models it cannot express are refused.
PEFT finds prototypes by power iteration, which agrees with pelthub's exact SVD when each ΔW's
top singular value is well separated.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import ConfigError
from ..model.modular import ModularModel
from ..modules.lora import LoRA
from ..routing.arrow import arrow_module
from ..sites import is_linear
from .peft import export

CONFIG = "arrow_config.json"


@torch.no_grad()
def export_arrow_peft(model: ModularModel, directory: str | os.PathLike) -> Path:
    """Write the Arrow model's sources (task_0, task_1, ...) and arrow_config.json under `directory`."""
    module = arrow_module(model)
    c = module.config
    layout = dict(c.layout)
    sites = sorted(layout)
    ranks = {r for entries in layout.values() for _, r in entries}
    per_site = {s: len(entries) for s, entries in layout.items()}
    if len(ranks) > 1 or set(per_site.values()) != {len(c.sources)}:
        raise ConfigError(f"PEFT's Arrow needs every source to adapt the same layers with one rank; these sources "
                          f"have ranks {sorted(ranks)} and adapt {per_site} (layer: sources). Keep this model in "
                          "pelthub's format (save_pretrained)")
    last = {s.rsplit(".", 1)[-1] for s in sites}
    stray = [n for n, m in model.base.named_modules()
             if n and n.rsplit(".", 1)[-1] in last and is_linear(m) and n not in layout]
    if stray:
        raise ConfigError(f"PEFT's Arrow routes on every module named {sorted(last)}, which here also includes "
                          f"{stray[:3]} that the sources do not adapt; keep this model in pelthub's format")
    (r,) = ranks
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(c.sources)):
        carrier = ModularModel(model.base)  # a second wrapper, detached right after writing
        try:
            carrier.add("task", [LoRA(r=r, alpha=float(r), targets=tuple(sites))])
            for site, layer in carrier.adapters["task"]["lora"].layers.items():
                arrow = module.layers[site]
                layer.lora_a.copy_(arrow.lora_a[i])
                layer.lora_b.copy_(arrow.lora_b[i].T)    # Arrow holds (s·B)ᵀ
            export(carrier, out / f"task_{i}", format="peft")
        finally:
            carrier.detach()
    fields = {"top_k": c.top_k, "router_temperature": float(module.log_temperature.exp()), "use_gks": False,
              "rng_seed": 0}
    (out / CONFIG).write_text(json.dumps(fields, indent=2), encoding="utf-8")
    return out

