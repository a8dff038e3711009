"""Cross-model prompt projector (Su et al. 2022): carry soft prompts from one base model to another.

A prompt P_s ∈ R^{l×d_s} trained on the source base becomes a prompt for the target base:

    P_t = LN(reshape_{l×d_t}(W₂ · tanh(W₁ · vec(P_s) + b₁) + b₂))

with W₁ ∈ R^{h×l·d_s}, W₂ ∈ R^{l·d_t×h} (h = 768 by default) and LN a LayerNorm over each of
the l rows (width d_t, with its own gain and bias). The bases may differ in width, depth and
architecture; only the prompt length l is shared.

`train_projector` fits W₁, b₁, W₂, b₂ and LN on one task's data by the task loss of the frozen
target base, its projected prompt fed to the target as a soft prompt (nothing else trains: not
the base, not its head). `project_prompts` then maps other prompts of the source base, read from
a registry, and registers each result with its source module as parent, the target's fingerprint
as `base_model` and the source base's fingerprint under `source["projected_from"]`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..errors import ConfigError
from ..model.modular import ModularModel
from ..modules.config import check_fields, positive_int
from ..modules.prompt import Prompt
from ..registry import Registry
from ..training import Data, fit
from .methods import prompt_module, prompt_tensor

SET = "projected"  # the module set the projected prompt is attached as
TAG = "projected"


@dataclass(frozen=True)
class ProjectorConfig:
    """Sizes of a projector: prompt length l, source and target widths d_s, d_t, hidden width h."""

    length: int
    source_hidden: int
    target_hidden: int
    hidden: int = 768

    def __post_init__(self) -> None:
        check_fields(self)
        for field in ("length", "source_hidden", "target_hidden", "hidden"):
            positive_int("ProjectorConfig", field, getattr(self, field))

    @classmethod
    def between(cls, source: nn.Module, target: nn.Module, length: int, hidden: int = 768) -> "ProjectorConfig":
        """The config for prompts of `length` tokens from base `source` to base `target` (their embedding widths)."""
        return cls(length, _width(source), _width(target), hidden)


def _width(base: nn.Module) -> int:
    base = base.base if isinstance(base, ModularModel) else base
    return base.get_input_embeddings().weight.shape[1]


class Projector(nn.Module):
    """P_t = LN(reshape_{l×d_t}(W₂ · tanh(W₁ · vec(P_s) + b₁) + b₂)), for one (l, d_s) prompt or a stack (n, l, d_s)."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.config = config
        l, h = config.length, config.hidden
        self.up = nn.Linear(l * config.source_hidden, h)      # W₁, b₁
        self.down = nn.Linear(h, l * config.target_hidden)    # W₂, b₂
        self.norm = nn.LayerNorm(config.target_hidden)

    def forward(self, prompts: torch.Tensor) -> torch.Tensor:
        c = self.config
        if not isinstance(prompts, torch.Tensor) or prompts.dim() not in (2, 3) or \
                tuple(prompts.shape[-2:]) != (c.length, c.source_hidden):
            got = tuple(prompts.shape) if isinstance(prompts, torch.Tensor) else type(prompts).__name__
            raise ConfigError(f"this projector maps prompts of {c.length} tokens x width {c.source_hidden} (shape "
                              f"({c.length}, {c.source_hidden}), or (n, {c.length}, {c.source_hidden}) for n "
                              f"prompts), got {got}; build a Projector(ProjectorConfig.between(source, target, "
                              "length)) for these prompts")
        flat = prompts.flatten(-2).to(self.up.weight.dtype)
        out = self.down(torch.tanh(self.up(flat)))
        return self.norm(out.unflatten(-1, (c.length, c.target_hidden)))


def _plain(base: nn.Module, role: str) -> nn.Module:
    if isinstance(base, ModularModel):
        raise ConfigError(f"pass the plain {role} base (not a ModularModel): a prompt is attached to it alone and "
                          "detached again afterwards; use model.base")
    return base


def _attach_prompt(projector: Projector, target: nn.Module) -> ModularModel:
    """`target` with an empty prompt of the projector's length as set SET; its width must be d_t."""
    model = ModularModel(_plain(target, "target"))
    try:
        model.add(SET, [Prompt(length=projector.config.length)], init=False)
    except BaseException:
        model.detach()  # the base as it was (requires_grad flags included)
        raise
    width = prompt_module(model, SET).embeddings.shape[1]
    if width != projector.config.target_hidden:
        model.detach()
        raise ConfigError(f"the target base takes prompts of width {width}, this projector makes width "
                          f"{projector.config.target_hidden}; build it with ProjectorConfig.between(source, target, "
                          "length)")
    return model


def train_projector(projector: Projector, source_prompt: Any, target: nn.Module, data: Data, tokenizer: Any,
                    steps: int = 100, batch_size: int = 32, lr: float = 1e-3, seed: int = 0, max_length: int = 64,
                    progress: bool | str = False) -> list[float]:
    """Fit `projector` for `steps` AdamW steps so that projecting `source_prompt` solves `data` on `target`.

    `source_prompt`: the (l, d_s) prompt of the source base trained on this task (a tensor, a
    PromptModule or a ModularModel holding one). `target` is the plain target base, frozen, its own
    head included: the loss is its task loss with the projected prompt prepended, and only the
    projector's parameters receive gradients. Nothing stays attached to `target`. Returns the losses.
    """
    values = prompt_tensor(source_prompt)
    projector(values)  # checks the shape before anything is attached
    model = _attach_prompt(projector, target)
    try:
        return fit(_Projected(projector, values, model), data, tokenizer, steps=steps, batch_size=batch_size, lr=lr,
                   seed=seed, max_length=max_length, progress=progress)
    finally:
        model.detach()


class _Projected(nn.Module):
    """`model` (the target with an empty prompt) run with P_t = projector(values) as its prompt.

    Only the projector is a submodule, so `fit` trains its parameters and nothing else; the
    prompt parameter is replaced by P_t at each call (torch.func.functional_call), so the
    task loss reaches W₁, b₁, W₂, b₂ and LN through it.
    """

    def __init__(self, projector: Projector, values: torch.Tensor, model: ModularModel):
        super().__init__()
        self.projector = projector
        self.values = values.to(projector.up.weight.device)
        self.target = (model,)  # a tuple: not a submodule, so its parameters stay out of the optimizer
        self.prompt_name = next(n for n, _ in model.module_parameters())

    def train(self, mode: bool = True) -> "_Projected":
        self.target[0].train(mode)  # the target's dropout follows, as in `fit` on a ModularModel
        return super().train(mode)

    def forward(self, **batch: torch.Tensor) -> Any:
        return functional_call(self.target[0], {self.prompt_name: self.projector(self.values)}, kwargs=batch)


def project_prompts(projector: Projector, refs: Sequence[str], registry: Registry, source: nn.Module,
                    target: nn.Module, suffix: str = "-projected") -> dict[str, str]:
    """Project the prompts `refs` (registry modules trained on `source`) onto `target`; {source ref: new ref}.

    Each source module must hold exactly one soft prompt and fit `source` (its fingerprint is
    checked). All prompts are projected in one batched call. Each result is registered as
    `<source name><suffix>`: a Prompt on `target` (card `base_model`: the target and its
    fingerprint), with the source's task and tags plus "projected", the source module as parent,
    and `source={"projected_from": {"fingerprint": <the source base's>}, "projector": <its sizes>}`
    (the source base's name is left out: a local path must not leave the machine with a push).
    """
    cards = [registry.get(ref) for ref in refs]
    if not cards:
        raise ConfigError("project_prompts needs at least one source ref")
    prompts = torch.stack([_registered_prompt(registry, card.ref, source) for card in cards])
    with torch.no_grad():
        projected = projector.eval()(prompts.to(projector.up.weight.device))
    out = {}
    for card, values in zip(cards, projected):
        model = _attach_prompt(projector, target)
        try:
            with torch.no_grad():
                prompt_module(model, SET).embeddings.copy_(values)
            out[card.ref] = registry.add(
                model, name=f"{card.name}{suffix}", task=card.task, tags=[*card.tags, TAG], parents=[card.ref],
                description=f"The prompt of {card.ref} projected from its base to this one by a cross-model "
                            "prompt projector (Su et al. 2022).",
                source={"projected_from": {"fingerprint": card.base_model["fingerprint"]},
                        "projector": asdict(projector.config)})
        finally:
            model.detach()
    return out


def _registered_prompt(registry: Registry, ref: str, source: nn.Module) -> torch.Tensor:
    """The (l, d_s) prompt of module `ref`, loaded onto `source` (which checks the fingerprint)."""
    model = registry.load(ref, _plain(source, "source"), heads=False)
    try:
        return prompt_tensor(model).clone()
    finally:
        model.detach()
