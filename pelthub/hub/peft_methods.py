"""Per-method tensor and config mapping between pelthub modules and PEFT adapters.

Each `to_*` takes a pelthub config dict, the module's tensors (names
relative to the module, e.g. `layers.<site>.lora_a`) and the base model's
fingerprint, and returns PEFT's method fields and tensors (PEFT names, as
`get_peft_model_state_dict` writes them). Each `from_*` goes the other way.
Both conventions agree on the maths (checked against PEFT in
tests/test_peft_interop.py):

- LoRA: A (r, in), B (out, r), update scaled by alpha / r in both; PEFT's
  rsLoRA (alpha / √r) is folded into alpha on import.
- IA3: PEFT stores (out, 1) for output scaling and (1, in) for input scaling
  (its feed-forward modules); pelthub stores the vector and knows the side.
- Prompt tuning: both prepend the (L, d) prompt to the input embeddings.
- Prefix tuning: both use the flat (L, 2·N·kv_heads·head_dim) layout; a
  reparameterised pelthub prefix is exported as the prefix its MLP computes,
  which is what PEFT saves too.
- Poly: see peft_poly.py.
- KAdaptation (n = 1) → LoKr: pelthub's ΔW (in, out) = s·A ⊗ (u vᵀ) is, as PyTorch's (out, in)
  weight, s·Aᵀ ⊗ (v uᵀ) = (α/r)·kron(w1, w2) with w1 = Aᵀ, w2 = v uᵀ (w2_a = v, w2_b = uᵀ),
  r = 1, α = s and decompose_factor = a (PEFT then splits out = a·out/a, in = a·in/a). PEFT
  stores w2 whole instead when max(in/a, out/a) ≤ 2r. Export only.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError, ModuleFormatError
from ..sites import Sites
from ..modules import IA3, LoRA, Prefix, Prompt
from ..modules.base import site_key, site_name
from ..modules.config import config_from_dict
from ..routing.poly import PolyModule
from . import peft_poly

PREFIX = "base_model.model."
CONV1D_TYPES = {"gpt2"}  # families whose linear layers are transformers' Conv1D (PEFT's fan_in_fan_out)
PEFT_TYPES = {"lora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "poly": "POLY",
              "kadaptation": "LOKR"}
PROMPT_LEARNING = {"prompt", "prefix"}
Tensors = dict[str, torch.Tensor]


# ----- pelthub → PEFT -----
def to_lora(config: dict[str, Any], own: Tensors, fp: dict[str, Any]) -> tuple[dict[str, Any], Tensors]:
    state = {}
    for key, tensor in own.items():  # layers.<site-key>.lora_a / lora_b
        _, site, which = key.split(".")
        state[f"{PREFIX}{site_name(site)}.lora_{'A' if which == 'lora_a' else 'B'}.weight"] = tensor
    fields = {"r": config["r"], "lora_alpha": config["alpha"], "lora_dropout": config["dropout"],
              "target_modules": _sites(own), "bias": "none", "fan_in_fan_out": fp.get("model_type") in CONV1D_TYPES,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True}
    return fields, state


def to_ia3(config: dict[str, Any], own: Tensors, fp: dict[str, Any]) -> tuple[dict[str, Any], Tensors]:
    sites = _sites(own)
    on_input = _ia3_inputs(config, sites, fp.get("model_type") or "")
    state = {f"{PREFIX}{s}.ia3_l": own[f"scales.{site_key(s)}"].reshape((1, -1) if on_input[s] else (-1, 1))
             for s in sites}
    fields = {"target_modules": sites, "feedforward_modules": [s for s in sites if on_input[s]],
              "fan_in_fan_out": fp.get("model_type") in CONV1D_TYPES, "init_ia3_weights": True}
    return fields, state


def to_prompt(config: dict[str, Any], own: Tensors, fp: dict[str, Any]) -> tuple[dict[str, Any], Tensors]:
    embeddings = own["embeddings"]
    return {**_prompt_fields(config["length"], fp), "token_dim": embeddings.shape[1],
            "prompt_tuning_init": "RANDOM"}, {"prompt_embeddings": embeddings}


@torch.no_grad()
def to_prefix(config: dict[str, Any], own: Tensors, fp: dict[str, Any]) -> tuple[dict[str, Any], Tensors]:
    if config["hidden"] is None:
        flat = own["values"]
    else:  # the prefix the reparameterisation computes (Prefix.collapse), as PEFT saves it
        hidden = torch.tanh(nn.functional.linear(own["embedding"], own["mlp.0.weight"], own["mlp.0.bias"]))
        flat = nn.functional.linear(hidden, own["mlp.2.weight"], own["mlp.2.bias"])
    if flat.shape[1] % (2 * fp["layers"]):
        raise ModuleFormatError(f"prefix width {flat.shape[1]} is not 2 × {fp['layers']} layers × a key/value size")
    return ({**_prompt_fields(config["length"], fp), "token_dim": fp["hidden"], "prefix_projection": False,
             "encoder_hidden_size": fp["hidden"]}, {"prompt_embeddings": flat.contiguous()})


def to_poly(config: dict[str, Any], own: Tensors, fp: dict[str, Any]) -> tuple[dict[str, Any], Tensors]:
    if fp.get("model_type") in CONV1D_TYPES:
        raise ConfigError(f"PEFT's Poly adapts nn.Linear layers only; {fp['model_type']} uses Conv1D layers, so this "
                          "Poly module cannot be exported to PEFT (use format='pelthub')")
    poly = config_from_dict(config)
    dims = {}
    for key, a in own.items():
        if key.endswith(".lora_a"):
            site = key.split(".")[1]
            b = own[f"layers.{site}.lora_b"]
            dims[site_name(site)] = (a.shape[0] * a.shape[2], b.shape[0] * b.shape[3])
    module = PolyModule(poly, dims)
    module.load_state_dict(own)
    fields = {"r": poly.rank, "target_modules": sorted(dims), "n_tasks": len(poly.tasks), "n_skills": poly.skills,
              "n_splits": poly.heads, "poly_type": "poly", "init_weights": True}
    return fields, peft_poly.to_peft_state_dict(module)


def to_kadaptation(config: dict[str, Any], own: Tensors, fp: dict[str, Any]) -> tuple[dict[str, Any], Tensors]:
    if config["n"] != 1:
        raise ConfigError(f"PEFT's LoKr holds one Kronecker product per layer; this KAdaptation sums n={config['n']} "
                          "of them, so it cannot be exported to PEFT (use n=1, or format='pelthub')")
    if fp.get("model_type") in CONV1D_TYPES:
        raise ConfigError(f"PEFT's LoKr adapts nn.Linear layers; {fp['model_type']} uses Conv1D layers, so this "
                          "KAdaptation module cannot be exported to PEFT (use format='pelthub')")
    sites = sorted({site_name(k.split(".")[1]) for k in own if k.startswith("layers.")})
    target = _site_targets(config["targets"] or (), "lora", sites, fp.get("model_type") or "", "KAdaptation")
    slow = {s: own[f"slow.{site_key(target[s])}"][0] for s in sites}  # (a, a)
    sizes = sorted({a.shape[0] for a in slow.values()})
    if len(sizes) > 1:
        raise ConfigError(f"PEFT's LoKr splits every layer by one decompose_factor; this KAdaptation's targets use "
                          f"slow sizes a={sizes}: export one with a single a (set KAdaptation.a)")
    biased = [s for s in sites if own[f"layers.{site_key(s)}.bias"].any()]
    if biased:
        raise ConfigError(f"PEFT's LoKr has no bias; this KAdaptation's bias b is nonzero at {biased[:3]}, so it "
                          "cannot be exported to PEFT (train it with the bias at zero, or use format='pelthub')")
    state = {}
    for s in sites:
        u, v = own[f"layers.{site_key(s)}.u"][0], own[f"layers.{site_key(s)}.v"][0]
        state[f"{PREFIX}{s}.lokr_w1"] = slow[s].T
        if max(len(u), len(v)) > 2:  # r = 1 < max(in/a, out/a) / 2: PEFT's LoKr keeps w2 as w2_a @ w2_b
            state.update({f"{PREFIX}{s}.lokr_w2_a": v[:, None], f"{PREFIX}{s}.lokr_w2_b": u[None, :]})
        else:
            state[f"{PREFIX}{s}.lokr_w2"] = torch.outer(v, u)
    fields = {"r": 1, "alpha": config["scale"], "decompose_factor": sizes[0], "decompose_both": False,
              "target_modules": sites, "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
              "init_weights": True}
    return fields, state


def _prompt_fields(length: int, fp: dict[str, Any]) -> dict[str, Any]:
    return {"num_virtual_tokens": length, "num_transformer_submodules": 1, "num_layers": fp["layers"],
            "num_attention_heads": fp["heads"]}


def _sites(own: Tensors) -> list[str]:
    experts = [k for k in own if k.startswith("experts.")]
    if experts:
        raise ConfigError(f"PEFT export writes per-module LoRA / IA3 layers; this module also updates fused expert "
                          f"weights ({site_name(experts[0].split('.')[1])}), which it would drop: keep it in "
                          "pelthub's own format (save_pretrained)")
    return sorted({site_name(k.split(".")[1]) for k in own})


def _ia3_inputs(config: dict[str, Any], sites: list[str], model_type: str) -> dict[str, bool]:
    """Which sites IA3 scales on the input."""
    target = _site_targets(config["targets"] or (), "ia3", sites, model_type, "IA3")
    return {s: target[s] in config["feedforward"] for s in sites}


def _site_targets(targets: tuple[str, ...], default: str, sites: list[str], model_type: str,
                  what: str) -> dict[str, str]:
    """The target each site was adapted for, found as the module's build finds them (on a skeleton of the sites)."""
    finder = Sites(_Skeleton(model_type, sites))
    found = {name: t for t in targets or finder.default_targets(default) for name in finder.find(t) if name in sites}
    missing = [s for s in sites if s not in found]
    if missing:
        raise ModuleFormatError(f"{what} sites {missing[:3]} match none of its targets {targets}")
    return found


class _Skeleton(nn.Module):
    """Empty modules at the adapted sites' names, and a config naming the family: enough for `Sites.find`."""

    def __init__(self, model_type: str, names: list[str]):
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type, hidden_size=1, num_attention_heads=1)
        for name in names:
            parent: nn.Module = self
            for part in name.split("."):
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)


TO_PEFT: dict[str, Callable[..., tuple[dict[str, Any], Tensors]]] = {
    "lora": to_lora, "ia3": to_ia3, "prompt": to_prompt, "prefix": to_prefix, "poly": to_poly,
    "kadaptation": to_kadaptation}


# ----- PEFT → pelthub -----
def from_lora(cfg: dict[str, Any], state: Tensors, tasks: Any) -> tuple[Any, Tensors, set[str]]:
    for flag, fix in (("use_dora", "DoRA"), ("use_qalora", "QALoRA")):
        if cfg.get(flag):
            raise ConfigError(f"PEFT {fix} adapters have no pelthub equivalent; import plain LoRA adapters")
    if cfg.get("bias", "none") != "none" or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ConfigError("this PEFT LoRA trains biases or uses per-layer ranks/alphas (bias, rank_pattern, "
                          "alpha_pattern), which pelthub's LoRA does not have")
    pairs = _by_site(state, {".lora_A.weight": "lora_a", ".lora_B.weight": "lora_b"})
    ranks = {t.shape[0] for s in pairs.values() for n, t in s.items() if n == "lora_a"}
    if len(ranks) != 1:
        raise ModuleFormatError(f"PEFT LoRA layers have ranks {sorted(ranks)}; pelthub needs one rank")
    r = ranks.pop()
    alpha = float(cfg.get("lora_alpha", 8)) * (math.sqrt(r) if cfg.get("use_rslora") else 1.0)  # α/√r = (α√r)/r
    config = LoRA(r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0), targets=tuple(sorted(pairs)))
    own = {f"layers.{site_key(s)}.{n}": t for s, parts in pairs.items() for n, t in parts.items()}
    return config, own, {f"{PREFIX}{s}{suffix}" for s in pairs for suffix in (".lora_A.weight", ".lora_B.weight")}


def from_ia3(cfg: dict[str, Any], state: Tensors, tasks: Any) -> tuple[Any, Tensors, set[str]]:
    vectors = {s: parts["ia3_l"] for s, parts in _by_site(state, {".ia3_l": "ia3_l"}).items()}
    inputs = tuple(s for s, t in vectors.items() if t.shape[0] == 1 and t.shape[1] != 1)  # (1, in): feed-forward
    config = IA3(targets=tuple(sorted(vectors)), feedforward=inputs)
    return config, {f"scales.{site_key(s)}": t.flatten() for s, t in vectors.items()}, \
        {f"{PREFIX}{s}.ia3_l" for s in vectors}


def from_prompt(cfg: dict[str, Any], state: Tensors, tasks: Any) -> tuple[Any, Tensors, set[str]]:
    embeddings = _prompt_tensor(cfg, state)
    return Prompt(length=embeddings.shape[0]), {"embeddings": embeddings}, {"prompt_embeddings"}


def from_prefix(cfg: dict[str, Any], state: Tensors, tasks: Any) -> tuple[Any, Tensors, set[str]]:
    values = _prompt_tensor(cfg, state)
    return Prefix(length=values.shape[0], hidden=None), {"values": values}, {"prompt_embeddings"}


def from_poly(cfg: dict[str, Any], state: Tensors, tasks: Any) -> tuple[Any, Tensors, set[str]]:
    config, own = peft_poly.from_peft_state_dict(state, cfg, tasks=tuple(tasks) if tasks else None)
    return config, own, {k for k in state if any(p in k for p in (".poly_lora_A", ".poly_lora_B", ".poly_router."))}


def _prompt_tensor(cfg: dict[str, Any], state: Tensors) -> torch.Tensor:
    if (cfg.get("num_transformer_submodules") or 1) != 1:
        raise ConfigError("this PEFT adapter conditions both the encoder and the decoder "
                          "(num_transformer_submodules=2); pelthub prompts condition the encoder input only and "
                          "prefixes the decoder self-attention only, so it cannot be imported as is")
    if "prompt_embeddings" not in state:
        raise ModuleFormatError("a PEFT prompt/prefix adapter holds `prompt_embeddings`; this one does not")
    return state["prompt_embeddings"]


def _by_site(state: Tensors, suffixes: dict[str, str]) -> dict[str, Tensors]:
    sites: dict[str, Tensors] = {}
    for key, tensor in state.items():
        for suffix, name in suffixes.items():
            if key.startswith(PREFIX) and key.endswith(suffix):
                sites.setdefault(key[len(PREFIX):-len(suffix)], {})[name] = tensor
    incomplete = [s for s, parts in sites.items() if len(parts) != len(suffixes)]
    if not sites or incomplete:
        raise ModuleFormatError(f"PEFT weights need {', '.join(suffixes)} per layer; "
                                f"{'incomplete layers: ' + ', '.join(incomplete[:3]) if incomplete else 'none found'}")
    return sites


FROM_PEFT: dict[str, Callable[..., tuple[Any, Tensors, set[str]]]] = {
    "LORA": from_lora, "IA3": from_ia3, "PROMPT_TUNING": from_prompt, "PREFIX_TUNING": from_prefix,
    "POLY": from_poly}
