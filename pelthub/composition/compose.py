"""`compose`: the one entry point for composed models.

Blocks are configs like any module kind (routers such as Poly, UniPELT and
AttentionMix build modules that read the call's task ids or inputs), so a
composed model is a ModularModel and saves, loads and detaches like one.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..model import ModularModel, attach
from ..modules.config import ModuleConfig


def compose(base: nn.Module, *blocks: ModuleConfig, name: str = "composed", head: bool | str = False,
            tokenizer: Any = None) -> ModularModel:
    """Attach composition blocks (Poly, UniPELT, AttentionMix, ...) to `base` under `name`."""
    return attach(base, *blocks, name=name, head=head, tokenizer=tokenizer)
