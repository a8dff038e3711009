"""UniPELT (Mao et al. 2022): LoRA, prefix tuning and a bottleneck adapter, each behind a learned gate.

Every submodule instance gets its own gate, a `Linear(d → 1)` applied to that
submodule's input x (B, n, d) and averaged over the real tokens:

    g = Σ_t m_t · σ(w·x_t + b) / Σ_t m_t                        shape (B,)

- LoRA at a projection W₀ (input x):  y = W₀x + g · B·A·dropout(x)   (g replaces α/r)
- sequential adapter on h:            h ← h + g · up(act(down(h)))
- prefix of layer ℓ:                  K_p, V_p ← g·K_p, g·V_p, with x the hidden state
                                      entering that layer's self-attention

Deviation from the reference code, which averages σ over padding too: the
mean is masked. The masks are the ones the base model receives in this call
(`attention_mask`; `decoder_attention_mask` for the decoder sites of
encoder-decoder models, whose cross-attention keys and values read the
encoder). Prompts and prefixes widen those masks at the front; a site whose
input has n positions uses the mask's last n columns, so prompt positions
count as tokens and prefix columns never do. Without a mask the mean is plain.

The prefix enters as the pre-filled cache (`prefix()`); the gate is only known
inside each layer, so a forward pre-hook on every self-attention module scales
that layer's cached prefix before the attention appends its own keys. It acts
once per `prefix()` call: in generation, at the prefill step. Later decoding
steps see one new token, so the LoRA and adapter gates of those steps average
over that token only (as in the reference implementation).

Gated LoRA cannot be merged into the base weights: g depends on the input.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import transformers
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..sites import Sites
from ..model.compat import self_attention_layers
from ..modules.base import CallContext, CallState, Handle, PeltModule, site_key, site_name
from ..modules.bottleneck import Bottleneck
from ..modules.config import ModuleConfig
from ..modules.lora import LoRA, LoRALinear
from ..modules.prefix import Prefix

PARTS: dict[str, type[ModuleConfig]] = {"lora": LoRA, "prefix": Prefix, "adapter": Bottleneck}
MASKS = ("attention_mask", "decoder_attention_mask")
# Decoder sites of encoder-decoder models whose input is the encoder output.
_CROSS_KV = re.compile(r"(EncDecAttention\.[kv]|encoder_attn\.[kv]_proj|crossattention\.self\.(key|value))$")


@dataclass(frozen=True)
class UniPELT(ModuleConfig):
    """Config of UniPELT: any subset of gated LoRA, prefix tuning and a sequential adapter.

    The paper's settings (BERT-base): lora=LoRA(r=8) on q and v, prefix=Prefix(length=10,
    hidden=512), adapter=Bottleneck(reduction=16) (Pfeiffer placement, ReLU). UniPELT(AP)
    leaves out lora; UniPELT(APL) has all three. LoRA's alpha is unused: the gate scales it.
    """

    kind: ClassVar[str] = "unipelt"
    lora: LoRA | None = None
    prefix: Prefix | None = None
    adapter: Bottleneck | None = None

    def validate(self) -> None:
        for name, cls in PARTS.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise ConfigError(f"UniPELT.{name} must be a {cls.__name__}(...) config or None, got {value!r}")
        if all(getattr(self, name) is None for name in PARTS):
            raise ConfigError("UniPELT needs at least one of lora=, prefix=, adapter=; the paper's APL is "
                              "UniPELT(lora=LoRA(r=8), prefix=Prefix(length=10), adapter=Bottleneck(reduction=16))")
        if self.adapter is not None and self.adapter.placement == "parallel":
            raise ConfigError("UniPELT.adapter must be sequential: placement 'pfeiffer' (the paper's) or "
                              "'houlsby', got 'parallel'")

    def build(self, base: nn.Module, sites: Sites, **kwargs: Any) -> "UniPELTModule":
        cls = UniPELTPrefixModule if self.prefix is not None else UniPELTModule
        return cls(self, base, sites, **kwargs)


def mask_weights(mask: torch.Tensor | None, batch: int, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    """m_t / Σ_t m_t (B, n) from the last n columns of `mask` (B, m); None means a plain mean."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != batch:
        return None
    mask = mask[:, -n:].to(dtype)
    if mask.shape[1] < n:  # positions before the mask's first column count as tokens
        mask = torch.cat([mask.new_ones(batch, n - mask.shape[1]), mask], dim=1)
    return mask / mask.sum(1, keepdim=True).clamp_min(1.0)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` (B, n) over positions where the last n columns of `mask` (B, m) are set."""
    weights = mask_weights(mask, *values.shape, values.dtype)
    return values.mean(1) if weights is None else (values * weights).sum(1)


def lora_update(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """B·A·dropout(x), without the α/r scale."""
    return layer.dropout(x.to(layer.lora_a.dtype)) @ layer.lora_a.T @ layer.lora_b.T


class UniPELTModule(PeltModule):
    """The built submodules (`parts`), one gate per submodule instance (`gates`), and the hooks."""

    def __init__(self, config: UniPELT, base: nn.Module, sites: Sites, **kwargs: Any):
        super().__init__()
        self.config = config
        g = sites.geometry
        self.parts, self.gates = nn.ModuleDict(), nn.ModuleDict()
        self.prefix_layers: dict[str, int] = {}
        if config.lora is not None:
            lora = config.lora.build(base, sites, **kwargs)
            if len(lora.experts):  # weight updates: no per-input gate can scale them
                raise UnsupportedModelError(f"UniPELT gates each LoRA on its input, which fused expert weights "
                                            f"({site_name(next(iter(lora.experts)))}) are not hooked on; give "
                                            "UniPELT's LoRA linear targets (q, v, o) and add ph.LoRA for the experts")
            self.parts["lora"] = lora.layers
            self.gates["lora"] = nn.ModuleDict({k: nn.Linear(layer.lora_a.shape[1], 1)
                                                for k, layer in self.parts["lora"].items()})
        if config.adapter is not None:
            self.parts["adapter"] = config.adapter.build(base, sites, **kwargs).layers
            self.gates["adapter"] = nn.ModuleDict({k: nn.Linear(g.hidden, 1) for k in self.parts["adapter"]})
        if config.prefix is not None:
            self.parts["prefix"] = config.prefix.build(base, sites, **kwargs)
            self.prefix_layers = prefix_sites(sites)
            self.gates["prefix"] = nn.ModuleDict({site_key(n): nn.Linear(g.hidden, 1) for n in self.prefix_layers})
        self.encoder_decoder = g.encoder_decoder
        self.mask_of = {k: mask_for(site_name(k), g.encoder_decoder) for part in self.gates.values() for k in part}
        self.forced: dict[str, float] = {}
        self.ctx: CallContext | None = None  # set by install; per-call facts live in the call's scratch
        self._last: dict[str, dict[str, torch.Tensor]] = {}  # inspection only: the latest call's gates

    # ----- inspection and control -----
    def gate_values(self) -> dict[str, dict[str, torch.Tensor]]:
        """The gate each site applied last, detached: {site name: {"lora" | "adapter" | "prefix": (B,)}}.

        After a forward these are that forward's gates; after `generate`, the encoder's and the
        prefix gates are those of the prefill, the decoder's those of the last step.
        """
        return {site: dict(parts) for site, parts in self._last.items()}

    def force_gate(self, part: str, value: float | None) -> None:
        """Fix every gate of one submodule to `value` (e.g. 0.0 to switch it off); None restores learning."""
        if part not in self.parts:
            raise ConfigError(f"this UniPELT has no {part!r} submodule; it has {list(self.parts)}")
        if value is None:
            self.forced.pop(part, None)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"force_gate({part!r}, {value!r}): a gate is a number in [0, 1] (a sigmoid's range), "
                              "or None to learn it again")
        else:
            self.forced[part] = float(value)

    @torch.no_grad()
    def collapse(self) -> None:
        """Drop the prefix reparameterisation (see PrefixModule.collapse) and record it in the config."""
        if "prefix" in self.parts:
            self.parts["prefix"].collapse()
            self.config = self.config.replace(prefix=self.parts["prefix"].config)

    # ----- running -----
    def gate(self, part: str, key: str, x: torch.Tensor) -> torch.Tensor:
        """g (B,) of one submodule instance from its input x (B, n, d), or (B·n, d) rows (OPT's FFN)."""
        if x.dim() == 2:
            x = x.view(self._batch(x), -1, x.shape[-1])
        if part in self.forced:
            g = torch.full(x.shape[:1], self.forced[part], dtype=torch.float32, device=x.device)
        else:
            linear = self.gates[part][key]
            scores = torch.sigmoid(linear(x.to(linear.weight.dtype))).squeeze(-1)
            weights = self._call_weights(self.mask_of[key], scores)
            g = scores.mean(1) if weights is None else (scores * weights).sum(1)
        self._last.setdefault(site_name(key), {})[part] = g.detach()
        return g

    def _call_weights(self, mask: str, scores: torch.Tensor) -> torch.Tensor | None:
        """`mask_weights` of one call mask for scores (B, n), computed once per call and base step."""
        scratch = self._scratch()
        weights, key = scratch.setdefault("weights", {}), (mask, *scores.shape)
        if key not in weights:
            weights[key] = mask_weights(scratch.get("masks", {}).get(mask), *scores.shape, scores.dtype)
        return weights[key]

    def _batch(self, rows: torch.Tensor) -> int:
        """B of this base call, for a site that sees its (B·n, d) rows flattened."""
        batch = self._scratch().get("batch")
        if batch is None or rows.shape[0] % batch:
            raise UnsupportedModelError(f"UniPELT's gate got {tuple(rows.shape)} rows and cannot tell the batch "
                                        "apart from the tokens; call the model with input_ids or inputs_embeds")
        return batch

    def _scratch(self) -> dict[str, Any]:
        return self.ctx.scratch(self) if self.ctx is not None else {}

    def reads_call_state(self) -> bool:
        return True

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        self.ctx = ctx
        handles: list[Handle] = [base.register_forward_pre_hook(self._keep_masks, with_kwargs=True)]
        if self.encoder_decoder:  # generate runs the encoder on its own
            handles.append(base.get_encoder().register_forward_pre_hook(self._keep_encoder_mask, with_kwargs=True))
        for key, layer in self.parts["lora"].items() if "lora" in self.parts else ():
            handles.append(base.get_submodule(site_name(key)).register_forward_hook(self._lora_hook(key, layer)))
        for key, layer in self.parts["adapter"].items() if "adapter" in self.parts else ():
            handles.append(base.get_submodule(site_name(key)).register_forward_hook(self._adapter_hook(key, layer)))
        for name, index in self.prefix_layers.items():
            handles.append(base.get_submodule(name).register_forward_pre_hook(
                self._prefix_hook(site_key(name), index), with_kwargs=True))
        return handles

    def _keep_masks(self, _m: nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
        """The masks of this base call (each generation step is one), for the gates' masked means."""
        scratch = self._scratch()
        scratch["masks"], scratch["weights"] = {k: kwargs.get(k) for k in MASKS}, {}
        given = next((kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None), None)
        scratch["batch"] = given.shape[0] if given is not None else None

    def _keep_encoder_mask(self, _m: nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
        scratch = self._scratch()
        scratch.setdefault("masks", {})[MASKS[0]], scratch["weights"] = kwargs.get(MASKS[0]), {}

    def _lora_hook(self, key: str, layer: LoRALinear) -> Any:
        def hook(_m: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if self.ctx.bare:
                return out
            x = args[0]
            g = self.gate("lora", key, x)
            return out + (_expand(g, out) * lora_update(layer, x)).to(out.dtype)
        return hook

    def _adapter_hook(self, key: str, layer: nn.Module) -> Any:
        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            if self.ctx.bare:
                return out
            g = self.gate("adapter", key, out)
            return out + (_expand(g, out) * layer(out)).to(out.dtype)
        return hook

    def _prefix_hook(self, key: str, index: int) -> Any:
        """Pre-hook on layer `index`'s self-attention: scale the prefix in this call's cache by the gate.

        The cache is the one pelthub built for the call (held in the call state), not
        whatever keyword transformers passes it under, so a renamed argument cannot
        make the gate skip: `check_call` raises if a layer's gate did not run.
        """
        def hook(_m: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            state = self.ctx.current() if self.ctx is not None else None
            pending = self._scratch().get("pending_prefix")
            if state is None or state.cache is None or not pending or index not in pending:
                return
            pending.discard(index)
            x = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(x, torch.Tensor):
                raise UnsupportedModelError(f"UniPELT's prefix gate found no hidden states entering "
                                            f"{site_name(key)} (transformers {transformers.__version__})")
            g = self.gate("prefix", key, x)
            layer = self_attention_layers(state.cache)[index]
            scale = g.view(-1, 1, 1, 1).to(layer.keys.dtype)
            layer.keys, layer.values = layer.keys * scale, layer.values * scale
        return hook

    def check_call(self, state: CallState) -> None:
        missed = self.ctx.scratch(self).get("pending_prefix") if self.ctx is not None else None
        if missed:
            names = [n for n, i in self.prefix_layers.items() if i in missed]
            raise UnsupportedModelError(
                f"UniPELT's prefix gate did not run at {names[:3]}{'...' if len(names) > 3 else ''}: the "
                f"self-attention modules were not called before their cached prefix was used (transformers "
                f"{transformers.__version__}). Run `pelthub doctor`; until this release is supported, leave "
                "prefix= out of UniPELT")


class UniPELTPrefixModule(UniPELTModule):
    """UniPELT with a prefix: also provides the (ungated) prefix cache that the layer hooks gate."""

    def prefix(self, batch: int, ctx: CallContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ctx.scratch(self)["pending_prefix"] = set(self.prefix_layers.values())
        return self.parts["prefix"].prefix(batch, ctx)


def _expand(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, ..., 1) broadcasting against `like`; one value per row for (B·n, d) rows."""
    if like.dim() == 2:
        return g.repeat_interleave(like.shape[0] // g.shape[0])[:, None]
    return g.view(-1, *([1] * (like.dim() - 1)))


def mask_for(name: str, encoder_decoder: bool) -> str:
    """Which call mask covers the input of the site `name`."""
    decoder = encoder_decoder and "decoder" in name.split(".") and not _CROSS_KV.search(name)
    return MASKS[1] if decoder else MASKS[0]


def prefix_sites(sites: Sites) -> dict[str, int]:
    """Self-attention modules that receive the prefix → their cache layer index."""
    names = sites.require("attn", "UniPELT(prefix=...)")
    g = sites.geometry
    if g.encoder_decoder:  # the prefix lives in the decoder's self-attention cache
        names = [n for n in names if "decoder" in n.split(".")]
    if len(names) != g.layers:
        raise UnsupportedModelError(f"UniPELT(prefix=...) found {len(names)} self-attention modules for "
                                    f"{g.layers} prefixed layers in model_type={g.model_type!r}")
    indices = [getattr(sites.names[n], "layer_idx", None) for n in names]
    if not all(isinstance(i, int) for i in indices):
        indices = list(range(len(names)))
    return dict(zip(names, indices))
