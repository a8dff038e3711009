"""Where modules attach (sites) and the wrapped model that holds them."""
from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..modules.config import Buildable
from ..sites import Sites
from .hotswap import hotswap
from .io import load_modules
from .modular import ModularModel, TrainableParameters, warn_if_wrapped


def attach(model: nn.Module, *configs: Buildable, name: str = "default", head: bool | str = False,
           tokenizer: Any = None) -> ModularModel:
    """Attach modules to a transformers model (or add a set to a ModularModel).

    The base is frozen and never edited; only the new modules (and the task
    head copy, with `head=True`) train. `tokenizer` is needed by
    `Prompt(init="text")` only.
    """
    if isinstance(model, ModularModel):
        return model.add(name, configs, head=head, tokenizer=tokenizer)
    warn_if_wrapped(model)
    wrapped = ModularModel(model)
    try:
        return wrapped.add(name, configs, head=head, tokenizer=tokenizer)
    except BaseException:
        wrapped.detach()  # give the base back as it was (requires_grad flags included)
        raise


def from_pretrained(base: nn.Module, directory: str | os.PathLike, strict_base: bool = True,
                    heads: bool | str = True) -> ModularModel:
    """Load modules saved with `save_pretrained` onto `base`.

    Raises IncompatibleModuleError if `base` has another architecture than the
    one the modules were trained on; warns if only the model name differs.
    `heads=False` leaves a saved task head out (e.g. for another label count);
    `heads="as_saved"` takes it at its own label count (see `io.load_modules`).
    """
    if isinstance(base, ModularModel):
        return load_modules(base, directory, strict_base=strict_base, heads=heads)
    model = ModularModel(base)
    try:
        return load_modules(model, directory, strict_base=strict_base, heads=heads)
    except BaseException:
        model.detach()  # a file that fails a check leaves the base as it was
        raise


__all__ = ["ModularModel", "Sites", "TrainableParameters", "attach", "from_pretrained", "hotswap"]
