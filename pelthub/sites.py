"""Where modules attach: architecture maps, auto-detection and fingerprints.

A *role* is an architecture-independent name for a kind of site ("q", "v",
"down", "ffn_in", ...). Each model family maps roles to regular expressions
over module names; unknown families fall back to common name patterns. A
config target that is not a role is read as a module-name suffix, so any
model can be adapted by naming its modules.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import SiteNotFoundError, UnsupportedModelError

_BERT = {
    "q": r"attention\.self\.query", "k": r"attention\.self\.key", "v": r"attention\.self\.value",
    "o": r"attention\.output\.dense", "up": r"intermediate\.dense", "down": r"layer\.\d+\.output\.dense",
    "attn": r"attention\.self", "ffn_in": r"layer\.\d+\.intermediate", "ffn_out": r"layer\.\d+\.output\.dense",
}
_T5 = {
    "q": r"(SelfAttention|EncDecAttention)\.q", "k": r"(SelfAttention|EncDecAttention)\.k",
    "v": r"(SelfAttention|EncDecAttention)\.v", "o": r"(SelfAttention|EncDecAttention)\.o",
    "up": r"DenseReluDense\.wi(_0|_1)?", "gate": r"DenseReluDense\.wi_0", "down": r"DenseReluDense\.wo",
    "attn": r"SelfAttention", "ffn_in": r"DenseReluDense", "ffn_out": r"DenseReluDense",
}
_GPT2 = {
    "qkv": r"attn\.c_attn", "o": r"attn\.c_proj", "up": r"mlp\.c_fc", "down": r"mlp\.c_proj",
    "attn": r"h\.\d+\.attn", "ffn_in": r"h\.\d+\.mlp", "ffn_out": r"h\.\d+\.mlp",
}
_LLAMA = {
    "q": r"self_attn\.q_proj", "k": r"self_attn\.k_proj", "v": r"self_attn\.v_proj", "o": r"self_attn\.o_proj",
    "up": r"mlp\.up_proj", "gate": r"mlp\.gate_proj", "down": r"mlp\.down_proj",
    "attn": r"self_attn", "ffn_in": r"layers\.\d+\.mlp", "ffn_out": r"layers\.\d+\.mlp",
}
_BART = {
    "q": r"(self_attn|encoder_attn)\.q_proj", "k": r"(self_attn|encoder_attn)\.k_proj",
    "v": r"(self_attn|encoder_attn)\.v_proj", "o": r"(self_attn|encoder_attn)\.out_proj",
    "up": r"layers\.\d+\.fc1", "down": r"layers\.\d+\.fc2",
    "attn": r"self_attn", "ffn_in": r"layers\.\d+\.fc1", "ffn_out": r"layers\.\d+\.fc2",
}
_FALLBACK = {
    "q": r"(q_proj|query|q_lin|q)", "k": r"(k_proj|key|k_lin|k)", "v": r"(v_proj|value|v_lin|v)",
    "o": r"(o_proj|out_proj|attention\.output\.dense|out_lin|o)", "up": r"(up_proj|fc1|intermediate\.dense|lin1|wi)",
    "down": r"(down_proj|fc2|lin2|wo)",
}
FAMILIES: dict[str, dict[str, str]] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT, "camembert": _BERT,
    "t5": _T5, "mt5": _T5, "gpt2": _GPT2, "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
    "qwen3": _LLAMA, "bart": _BART, "mbart": _BART,
}
# Default targets per kind when a config leaves `targets=None`.
_DEFAULT_TARGETS = {"lora": ("q", "v"), "ia3": ("k", "v", "down"), "poly": ("q", "v")}
_GPT2_DEFAULTS = {"lora": ("qkv",), "ia3": ("qkv", "down"), "poly": ("qkv",)}


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or a GPT-2 Conv1D (whose weight is [in, out])."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.weight.shape[1]
    raise SiteNotFoundError(
        f"{type(module).__name__} is not a linear layer; LoRA, IA3 and Poly target nn.Linear or Conv1D modules"
    )


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


@dataclass(frozen=True)
class Geometry:
    """The sizes modules are built from."""

    model_type: str
    hidden: int
    layers: int          # attention layers that receive a prefix (decoder layers for enc-dec)
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    encoder_decoder: bool
    decoder_only: bool


def _config_value(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


class Sites:
    """Finds attachment sites in one model."""

    def __init__(self, model: nn.Module):
        self.model = model
        config = getattr(model, "config", None)
        if config is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no `.config`; attach to a transformers PreTrainedModel"
            )
        self.config = config
        self.model_type = getattr(config, "model_type", "") or ""
        self.patterns = FAMILIES.get(self.model_type, _FALLBACK)
        self.names = dict(model.named_modules())
        self.geometry = self._geometry()

    def _geometry(self) -> Geometry:
        c = self.config
        hidden = _config_value(c, "hidden_size", "d_model", "n_embd")
        heads = _config_value(c, "num_attention_heads", "num_heads", "n_head")
        if hidden is None or heads is None:
            raise UnsupportedModelError(
                f"cannot read hidden size / head count from {type(c).__name__}; "
                "set hidden_size and num_attention_heads on the config"
            )
        enc_dec = bool(getattr(c, "is_encoder_decoder", False))
        layers = (_config_value(c, "num_decoder_layers", "decoder_layers", "num_layers") if enc_dec
                  else _config_value(c, "num_hidden_layers", "n_layer", "num_layers"))
        head_dim = _config_value(c, "head_dim", "d_kv", default=hidden // heads)
        decoder_only = not enc_dec and (bool(getattr(c, "is_decoder", False)) or self.model_type in
                                        {"gpt2", "llama", "mistral", "qwen2", "qwen3"})
        return Geometry(
            model_type=self.model_type, hidden=hidden, layers=layers, heads=heads,
            kv_heads=_config_value(c, "num_key_value_heads", default=heads), head_dim=head_dim,
            vocab=_config_value(c, "vocab_size", default=0), encoder_decoder=enc_dec, decoder_only=decoder_only,
        )

    def default_targets(self, kind: str) -> tuple[str, ...]:
        table = _GPT2_DEFAULTS if self.model_type == "gpt2" else _DEFAULT_TARGETS
        return table[kind]

    def roles(self) -> list[str]:
        return sorted(r for r in self.patterns if self._match_role(r))

    def _match_role(self, role: str) -> list[str]:
        regex = re.compile(r"(^|\.)" + self.patterns[role] + r"$")
        return [n for n in self.names if n and regex.search(n)]

    def find(self, target: str, linear: bool = False) -> list[str]:
        """Module names for a role or a module-name suffix; [] when nothing matches."""
        found = self._match_role(target) if target in self.patterns else [
            n for n in self.names if n == target or n.endswith("." + target)]
        if linear:
            found = [n for n in found if is_linear(self.names[n])]
        return found

    def resolve(self, targets: tuple[str, ...], linear: bool = False, what: str = "module") -> dict[str, list[str]]:
        """Map each target to its module names, or fail listing what exists."""
        resolved = {t: self.find(t, linear) for t in targets}
        missing = [t for t, names in resolved.items() if not names]
        if missing:
            suffixes = sorted({".".join(n.split(".")[-2:]) for n, m in self.names.items() if is_linear(m)})
            raise SiteNotFoundError(
                f"{what} targets {missing} match no {'linear ' if linear else ''}module of this "
                f"{type(self.model).__name__} (model_type={self.model_type!r}). Roles available here: "
                f"{self.roles()}; or name modules by suffix, e.g. one of {suffixes[:12]}"
            )
        return resolved

    def require(self, role: str, what: str) -> list[str]:
        """Module names of a structural role (ffn_in, attn, ...), or an UnsupportedModelError."""
        if role not in self.patterns or not self._match_role(role):
            raise UnsupportedModelError(
                f"{what} needs the {role!r} sites, which pelthub cannot find in model_type="
                f"{self.model_type!r}. Supported families: {sorted(FAMILIES)}; for another model, "
                f"add a pattern to pelthub.sites.FAMILIES[{self.model_type!r}]"
            )
        return self._match_role(role)

    def fingerprint(self) -> dict[str, Any]:
        """Architecture identity of the backbone: model type plus every parameter's name and shape.

        Task heads are left out (`model.base_model`), so one backbone with heads of different
        label counts shares a fingerprint; any change of sizes or layers changes it.
        """
        backbone = getattr(self.model, "base_model", self.model)
        shapes = sorted((_unparametrized(n), list(p.shape)) for n, p in backbone.named_parameters())
        body = json.dumps({"model_type": self.model_type, "params": shapes}, sort_keys=True)
        g = self.geometry
        return {"sha256": hashlib.sha256(body.encode()).hexdigest(), "model_type": g.model_type,
                "hidden": g.hidden, "layers": g.layers, "heads": g.heads, "vocab": g.vocab}


def _unparametrized(name: str) -> str:
    """A parameter's name as it is without torch parametrisations (LN-tuning adds them)."""
    return name.replace("parametrizations.", "").replace(".original", "")
