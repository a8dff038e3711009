"""Transfer from a source prompt: initialisation (SPoT) and distillation (PANDA).

`init_from(model, source)`: the target prompt starts as the source prompt,
P_tgt ← P_src, and is then tuned as usual (Vu et al. 2022).

`distill(student, teacher, data, tokenizer, beta)`: the teacher (a source
prompt already tuned on the target task) is frozen; the student (a fresh
prompt and head) minimises, per batch of B examples with logits z,

    L = CE(z_s, y) + 0.1 · β · (1/B) Σ_b ‖z_s,b − z_t,b‖²

with β the transferability score of the source (Zhong et al., PANDA). With
β = 0 the loop is exactly `pelthub.training.fit`: same seed, batches,
optimizer and losses.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..model.modular import ModularModel
from ..modules.prompt import PromptModule
from ..training import Data, batches, param_groups

FITS = ("error", "cycle")


def prompt_module(model: ModularModel, name: str | None = None) -> PromptModule:
    """The soft prompt of `model` (of module set `name` when given); exactly one must exist."""
    if name is not None:
        if name not in model.adapters or "prompt" not in model.adapters[name]:
            raise ConfigError(f"no prompt in module set {name!r}; sets with a prompt: "
                              f"{[n for n, s in model.adapters.items() if 'prompt' in s]}")
        return model.adapters[name]["prompt"]
    found = [m for m in model.modules_of("prompt") if isinstance(m, PromptModule)]
    if len(found) != 1:
        raise ConfigError(f"the model holds {len(found)} soft prompts; exactly one is needed here "
                          "(pass name= to pick a module set)")
    return found[0]


def prompt_tensor(value: Any) -> torch.Tensor:
    """The (L, d) values of a tensor, a PromptModule or a ModularModel holding one prompt (detached)."""
    if isinstance(value, ModularModel):
        value = prompt_module(value)
    if isinstance(value, PromptModule):
        value = value.embeddings
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        raise ConfigError("a source prompt is a (length, hidden) tensor, a PromptModule or a ModularModel with one "
                          f"prompt, got {type(value).__name__}"
                          f"{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}")
    return value.detach()


def init_from(model: ModularModel, source: Any, fit: str = "error", name: str | None = None) -> ModularModel:
    """Copy `source`'s prompt into `model`'s prompt (SPoT transfer); returns `model`.

    The lengths must match, unless `fit="cycle"`: a longer source is cut to its
    first L tokens and a shorter one repeated cyclically up to L tokens (as
    `Prompt(init="text")` does with the text's tokens).
    """
    if fit not in FITS:
        raise ConfigError(f"fit must be one of {FITS}, got {fit!r}")
    target = prompt_module(model, name)
    values = prompt_tensor(source)
    length, d = target.embeddings.shape
    if values.shape[1] != d:
        raise ConfigError(f"the source prompt has width {values.shape[1]} but this model's prompt has width {d}: "
                          "use a prompt trained on this base model")
    if values.shape[0] != length:
        if fit == "error":
            raise ConfigError(f"the source prompt has {values.shape[0]} tokens, the target prompt {length}; use "
                              f"Prompt(length={values.shape[0]}) or init_from(..., fit='cycle')")
        values = values.repeat(-(-length // values.shape[0]), 1)[:length]
    with torch.no_grad():
        target.embeddings.copy_(values.to(target.embeddings))
    return model


def _shares_hooked_base(a: nn.Module, b: nn.Module) -> bool:
    return (isinstance(a, ModularModel) and isinstance(b, ModularModel) and a.base is b.base
            and bool(len(a.heads) or len(b.heads)))


def distill(student: nn.Module, teacher: nn.Module, data: Data, tokenizer: Any, beta: float, steps: int = 100,
            batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0, max_length: int = 64,
            progress: bool | str = False) -> list[float]:
    """Train `student`'s trainable parameters for `steps` AdamW steps on the PANDA loss; returns the losses.

    The teacher runs in eval mode without gradients, with its parameters'
    `requires_grad` off for the duration (restored after), so its weights do
    not change. Student and teacher must be separate models: two
    ModularModels with task heads on one base object would both swap the
    head's output (use `copy.deepcopy(base)` for one of them).
    """
    if student is teacher or _shares_hooked_base(student, teacher):
        raise ConfigError("student and teacher must be separate models (their heads would share hooks on one "
                          "base): attach the teacher to copy.deepcopy(base)")
    if beta < 0:
        raise ConfigError(f"beta must be >= 0 (a transferability score), got {beta!r}")
    torch.manual_seed(seed)
    device = next(student.parameters()).device
    optimizer = torch.optim.AdamW(param_groups(student, lr, None, weight_decay))
    stream = batches(data, tokenizer, batch_size, getattr(student, "task_names", ()), seed=seed,
                     max_length=max_length)
    flags = [(p, p.requires_grad) for p in teacher.parameters()]
    teacher.requires_grad_(False)
    teacher_training = teacher.training
    teacher.eval()
    losses: list[float] = []
    student.train()
    bar = tqdm(range(steps), desc=progress if isinstance(progress, str) else "distill", disable=not progress,
               leave=False)
    try:
        for _ in bar:
            batch = {k: v.to(device) for k, v in next(stream).items()}
            with torch.no_grad():
                z_t = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
            out = student(**batch)
            loss = out.loss + 0.1 * beta * ((out.logits - z_t) ** 2).sum() / out.logits.shape[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        teacher.train(teacher_training)
        student.eval()
    return losses
