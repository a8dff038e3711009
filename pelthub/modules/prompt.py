"""Soft prompts (Lester et al. 2021): L trainable embeddings prepended to the input.

For encoder-decoder models the prompt goes to the encoder input only; for
decoder-only models it is prepended to the sequence (labels get -100 there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..sites import Sites
from .base import CallContext, PeltModule
from .config import ModuleConfig, one_of, positive_int

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
        positive_int("Prompt", "vocab_top", self.vocab_top)
        if self.init == "text" and not self.text:
            raise ConfigError("Prompt(init='text') needs text='...': the words whose embeddings start the prompt")

    def build(self, base: nn.Module, sites: Sites, tokenizer: Any = None, init: bool = True,
              **_: object) -> "PromptModule":
        embedding = base.get_input_embeddings().weight
        return PromptModule(self, initial_prompt(self, embedding, tokenizer) if init
                            else torch.zeros(self.length, embedding.shape[1]))


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
    def __init__(self, config: Prompt, values: torch.Tensor):
        super().__init__()
        self.config = config
        self.embeddings = nn.Parameter(values)

    def prompt(self, embeds: torch.Tensor, mask: torch.Tensor | None, ctx: CallContext) -> torch.Tensor:
        return self.embeddings.unsqueeze(0).expand(embeds.shape[0], -1, -1)
