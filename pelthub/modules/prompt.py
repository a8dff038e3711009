"""Soft prompts (Lester et al. 2021): L trainable embeddings prepended to the input.

For encoder-decoder models the prompt goes to the encoder input only; for
decoder-only models it is prepended to the sequence (labels get -100 there).

Models that read images or audio features (ViT, DeiT, CLIP, Whisper: a `main_input_name`
other than `input_ids`) have no token embeddings to extend. There the prompt is L tokens
inserted into the input of the first layer, after the tokens the embedding adds before the
patches ([CLS], DeiT's distillation token): VPT-shallow's placement, [x_cls, P, E].
A hook on the patch embedding counts the patches of each call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..sites import Sites
from .base import CallContext, Handle, PeltModule
from .config import MAX_VOCAB, ModuleConfig, one_of, positive_int

INITS = ("random", "vocab", "text")


@dataclass(frozen=True)
class Prompt(ModuleConfig):
    """Config of a soft prompt.

    length: number of virtual tokens L. init: "random" (uniform in [-0.5, 0.5]),
    "vocab" (rows of the input embedding matrix drawn at random from the first
    `vocab_top` ids) or "text" (the embeddings of `text`, cycled to L tokens;
    needs `tokenizer=` at attach time).
    """

    kind: ClassVar[str] = "prompt"
    length: int = 20
    init: str = "random"
    text: str | None = None
    vocab_top: int = 5000

    def validate(self) -> None:
        positive_int("Prompt", "length", self.length)
        one_of("Prompt", "init", self.init, INITS)
        positive_int("Prompt", "vocab_top", self.vocab_top, MAX_VOCAB)
        if self.init == "text" and not self.text:
            raise ConfigError("Prompt(init='text') needs text='...': the words whose embeddings start the prompt")

    def build(self, base: nn.Module, sites: Sites, tokenizer: Any = None, init: bool = True,
              **_: object) -> "PromptModule":
        reads = getattr(base, "main_input_name", "input_ids")
        if reads == "input_ids":
            embedding = base.get_input_embeddings().weight
            return PromptModule(self, initial_prompt(self, embedding, tokenizer) if init
                                else torch.zeros(self.length, embedding.shape[1]))
        if self.init != "random":
            raise ConfigError(f"Prompt(init={self.init!r}) starts from token embeddings, which "
                              f"{type(base).__name__} (it reads {reads}) has none of; use init='random'")
        if not sites.stacks:
            raise UnsupportedModelError(f"a prompt on {type(base).__name__} goes into its first layer, but "
                                        f"pelthub finds no repeated layers: {sites.describe()}")
        hidden = sites.geometry.hidden
        values = torch.empty(self.length, hidden).uniform_(-0.5, 0.5) if init else torch.zeros(self.length, hidden)
        patches = base.get_input_embeddings() if reads == "pixel_values" else None
        return PromptModule(self, values, first_layer=sites.stacks[0][0],
                            patches=next((n for n, m in sites.names.items() if m is patches), None))


def initial_prompt(config: Prompt, embedding: torch.Tensor, tokenizer: Any = None) -> torch.Tensor:
    """The (L, d) starting values chosen by `config.init`."""
    length, (vocab, d) = config.length, embedding.shape
    if config.init == "random":
        return torch.empty(length, d).uniform_(-0.5, 0.5)
    if config.init == "vocab":
        ids = torch.randint(0, min(vocab, config.vocab_top), (length,))
    else:
        if tokenizer is None:
            raise ConfigError("Prompt(init='text') needs the tokenizer: attach(model, prompt, tokenizer=tok)")
        ids = torch.tensor(tokenizer(config.text, add_special_tokens=False)["input_ids"])
        if ids.numel() == 0:
            raise ConfigError(f"Prompt.text {config.text!r} tokenizes to nothing")
        ids = ids.repeat(-(-length // ids.numel()))[:length]
    return embedding.detach()[ids].float().clone()


class PromptModule(PeltModule):
    """Prepended to the input embeddings (`prompt`), or, with `first_layer`, inserted into that layer's
    input after the tokens that precede the output of `patches` (none when it is None)."""

    def __init__(self, config: Prompt, values: torch.Tensor, first_layer: str | None = None,
                 patches: str | None = None):
        super().__init__()
        self.config = config
        self.embeddings = nn.Parameter(values)
        self.first_layer, self.patches = first_layer, patches

    def provides(self, method: str) -> bool:
        return self.first_layer is None if method == "prompt" else super().provides(method)

    def prompt(self, embeds: torch.Tensor, mask: torch.Tensor | None, ctx: CallContext) -> torch.Tensor:
        return self.embeddings.unsqueeze(0).expand(embeds.shape[0], -1, -1)

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        if self.first_layer is None:
            return []
        handles = []
        if self.patches is not None:
            def count(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
                # (B, N, d) patch tokens, or a convolution's (B, d, h, w) map (CLIP)
                ctx.scratch(self)["patches"] = out.shape[2] * out.shape[3] if out.dim() == 4 else out.shape[1]
            handles.append(base.get_submodule(self.patches).register_forward_hook(count))
        return [*handles, base.get_submodule(self.first_layer).register_forward_pre_hook(
            lambda _m, args, kwargs: self._insert(args, kwargs, ctx), with_kwargs=True)]

    def _insert(self, args: tuple, kwargs: dict, ctx: CallContext) -> tuple[tuple, dict] | None:
        if ctx.selecting:  # the bare base (`disable_adapter`)
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        lead = 0
        if self.patches is not None:
            patches = ctx.scratch(self).get("patches")
            if patches is None:
                raise ConfigError("a prompt on an image model is placed per call: call the ModularModel, "
                                  "not its base, while the prompt is attached")
            lead = hidden.shape[1] - patches
        prompt = self.embeddings.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
        hidden = torch.cat([hidden[:, :lead], prompt, hidden[:, lead:]], dim=1)
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
