"""VPT (Jia et al. 2022, "Visual Prompt Tuning"): p prompt tokens in a vision transformer's sequence.

The first layer reads [x_cls, P₀, E] (no positional embedding on P₀), the placement `Prompt` uses
on image models. Shallow VPT stops there: the prompt tokens flow on like patches. Deep VPT replaces
them before every later layer i ≥ 1 by a fresh P_i, so each layer sees prompts of its own:

    x_{i+1} = L_i([x_cls, P_i, E_i]),   the outputs at P_i's positions dropped

Init U(±√(6 / (3·ph·pw + d))), ph × pw the patch size (the paper's). p = 0 is the base model.
Reaches models that read `pixel_values` or `input_features` (ViT, DeiT, CLIP vision, Whisper's
encoder); on text models use `Prompt` or `Prefix`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..sites import Sites
from .base import CallContext, Handle
from .config import ModuleConfig, flag, positive_int
from .prompt import Prompt, PromptModule


@dataclass(frozen=True)
class VPT(ModuleConfig):
    """Config of visual prompt tuning. length: p, prompt tokens per layer (0: none). deep: fresh prompts
    before every layer (VPT-deep) or only before the first (VPT-shallow, the same as `Prompt` there)."""

    kind: ClassVar[str] = "vpt"
    length: int = 5
    deep: bool = True

    def validate(self) -> None:
        if self.length != 0:
            positive_int("VPT", "length", self.length)
        flag("VPT", "deep", self.deep)

    def build(self, base: nn.Module, sites: Sites, init: bool = True, **_: object) -> "VPTModule":
        reads = getattr(base, "main_input_name", "input_ids")
        if reads == "input_ids":
            raise UnsupportedModelError(f"VPT prompts vision and audio transformers; {type(base).__name__} reads "
                                        "input_ids: use ph.Prompt (soft prompt) or ph.Prefix there")
        shallow = Prompt(length=max(self.length, 1)).build(base, sites, init=False)
        layers = sites.stacks[0] if self.deep else sites.stacks[0][:1]
        d = sites.geometry.hidden
        patch = getattr(base.config, "patch_size", 1)
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        bound = math.sqrt(6.0 / (3 * ph * pw + d))
        values = torch.empty(len(layers), self.length, d)
        if init:
            values.uniform_(-bound, bound)
        return VPTModule(self, values, layers, shallow.patches)


class VPTModule(PromptModule):
    """P₀ inserted by `PromptModule` into the first layer's input; P_i (`deep[i-1]`) put in place before layer i."""

    def __init__(self, config: VPT, values: torch.Tensor, layers: list[str], patches: str | None):
        super().__init__(config, values[0].clone(), first_layer=layers[0], patches=patches)
        self.deep = nn.Parameter(values[1:].clone())
        self.later = layers[1:]

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        if self.config.length == 0:
            return []
        return [*super().install(base, ctx), *(
            base.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, kwargs, i=i: self._replace(i, args, kwargs, ctx), with_kwargs=True)
            for i, name in enumerate(self.later))]

    def _replace(self, i: int, args: tuple, kwargs: dict, ctx: CallContext) -> tuple[tuple, dict] | None:
        if ctx.selecting:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        p = self.config.length
        patches = ctx.scratch(self).get("patches")
        lead = 0 if self.patches is None else hidden.shape[1] - p - patches
        prompt = self.deep[i].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
        hidden = torch.cat([hidden[:, :lead], prompt, hidden[:, lead + p:]], dim=1)
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
