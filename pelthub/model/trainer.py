"""Make `transformers.Trainer` output loadable with `ph.from_pretrained`.

Trainer calls `save_pretrained` only on a `PreTrainedModel` or `PeftModel` (an
isinstance check, no duck typing), so for a ModularModel it writes just
`model.safetensors` from `state_dict()`: the module and head tensors, without
the configs that say how to build them. This callback writes the missing
`pelthub.json` next to Trainer's weights, in the output folder when training
starts (where `trainer.save_model()` writes) and in every `checkpoint-N` it
saves; `from_pretrained` reads `model.safetensors` where `modules.safetensors`
is absent.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import ConfigError
from .io import CONFIG_FILE, atomic_write, describe
from .modular import ModularModel


class SaveModulesCallback(TrainerCallback):
    """Write `pelthub.json` wherever Trainer saves a ModularModel's weights.

    `Trainer(model, args, callbacks=[ph.SaveModulesCallback()])`; then
    `ph.from_pretrained(base, args.output_dir)` after `trainer.save_model()`, and
    `ph.from_pretrained(base, f"{args.output_dir}/checkpoint-{step}")` for any checkpoint.
    `trainer.save_model(other_dir)` fires no callback: use `model.save_pretrained(other_dir)` there.
    """

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, **kwargs: Any) -> None:
        if args.should_save:  # where Trainer writes its own files (every node with save_on_each_node)
            _write(_modular(model), Path(args.output_dir))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: Any = None, **kwargs: Any) -> None:
        if args.should_save:
            _write(_modular(model), Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _modular(model: Any) -> ModularModel:
    if not isinstance(model, ModularModel):
        raise ConfigError(f"SaveModulesCallback needs Trainer(model=<a pelthub ModularModel>), got "
                          f"{type(model).__name__}; wrap the base with ph.attach(...) first")
    return model


def _write(model: ModularModel, directory: Path) -> None:
    text = json.dumps(describe(model, saved_by="transformers.Trainer"), indent=2, sort_keys=True)
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
