"""Where modules attach: roles read off the model's structure, geometry and fingerprints.

A *role* is an architecture-independent name for a kind of site ("q", "v",
"down", "ffn_in", ...). Roles are derived from the model itself, not from a
per-family table, so a family pelthub has never seen is adapted the same way:

- the *blocks* are the children of the outermost `nn.ModuleList`s whose
  repeated layers hold linear projections (`model.layers`, `encoder.layer`,
  `transformer.h`, both stacks of an encoder-decoder);
- in each block, an *attention* module is one whose own linear children
  include three projections from the hidden size (q, k, v; told apart by
  their names) or one fused projection (`qkv`: its width is the query width
  plus two key/value widths, and no sibling reads it). Its output
  projection `o` (width → hidden) is a sibling, or a linear of the nearest
  enclosing module (BERT's `attention.output.dense`). The first attention
  of a block is its self-attention (`attn`), later ones are cross-attention;
- the *FFN* is what is left: `down` (intermediate → hidden) and the
  projection(s) from the hidden size that produce its input (`up`, and
  `gate` when one is named so). When they share a submodule (`mlp`,
  `DenseReluDense`), that submodule is both `ffn_in` and `ffn_out`; when they
  sit on the block itself or in separate children (OPT/BART `fc1`/`fc2`,
  BERT `intermediate`/`output`), `ffn_in` is the block child holding `up`
  and `ffn_out` is `down` itself, whose output is the FFN output before the
  residual and layer norm. A fused GLU projection (ModernBERT's `Wi`, Phi-3's
  `gate_up_proj`: twice the width `down` reads) is the `up`;
- *experts*: a mixture-of-experts block keeps its experts as fused 3-D
  parameters (transformers 5: `gate_up_proj` [E, 2I, d], `down_proj`
  [E, d, I]), which are no modules, so they are parameter sites (`experts`,
  roles `up` and `down`) and the MoE block holding them (the router beside
  them) is `ffn_in` and `ffn_out`.

Models with no such blocks fall back to common name patterns. A config
target that is not a role is read as a module-name suffix, so any model can
be adapted by naming its modules.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import SiteNotFoundError, UnsupportedModelError

ROLES = ("q", "k", "v", "qkv", "o", "up", "gate", "down", "attn", "ffn_in", "ffn_out")
# Which of several same-shaped projections is which: read from the module's own (last) name.
_NAMED = {
    "q": re.compile(r"(q|query|q_proj|query_proj|q_lin|wq)"), "k": re.compile(r"(k|key|k_proj|key_proj|k_lin|wk)"),
    "v": re.compile(r"(v|value|v_proj|value_proj|v_lin|wv)"), "gate": re.compile(r"(gate|gate_proj|wi_0|w1)"),
}
# Models whose blocks pelthub cannot read (no repeated layers with linear projections, e.g. a
# skeleton of site names) fall back to common module-name patterns.
_BY_NAME = {
    "q": r"(q_proj|query|query_proj|q_lin|q)", "k": r"(k_proj|key|key_proj|k_lin|k)",
    "v": r"(v_proj|value|value_proj|v_lin|v)", "qkv": r"(c_attn|query_key_value|qkv_proj|Wqkv)",
    "o": r"(o_proj|out_proj|out_lin|attention\.output\.dense|(Self|EncDec)Attention\.o|attn\.o|attn\.c_proj|"
         r"(self_attn|self_attention|attention)\.dense)",
    "up": r"(up_proj|fc1|lin1|wi|wi_1|c_fc|dense_h_to_4h|intermediate\.dense)", "gate": r"(gate_proj|wi_0)",
    "down": r"(down_proj|fc2|lin2|wo|mlp\.c_proj|dense_4h_to_h|layer\.\d+\.output\.dense)",
}
# Parameter names under which an attention module's forward takes its key/value cache.
_CACHE_PARAMS = ("cache", "past_key_values", "past_key_value", "layer_past")


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


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _within(name: str, scope: str) -> bool:
    return name == scope or name.startswith(scope + ".")


def _last(name: str) -> str:
    return name.rpartition(".")[2]


def find_blocks(names: dict[str, nn.Module]) -> list[list[str]]:
    """The repeated layers: children of each outermost ModuleList of same-typed modules with linears."""
    stacks: list[list[str]] = []
    for name, module in names.items():
        if not isinstance(module, nn.ModuleList) or not len(module) or any(
                _within(name, _parent(s[0])) for s in stacks):
            continue
        kids = list(module)
        if len({type(k) for k in kids}) == 1 and sum(is_linear(m) for m in kids[0].modules()) >= 2:
            stacks.append([f"{name}.{i}" if name else str(i) for i in range(len(kids))])
    return stacks


@dataclass
class _Attention:
    container: str              # the module holding q/k/v (or the fused qkv)
    region: str                 # container, or the enclosing module that also holds `o`
    projections: dict[str, str]  # role (q, k, v, qkv) → module name
    o: str | None


def _attention(parent: str, kids: dict[str, tuple[int, int]], d: int, width: int, head_dim: int,
               linears: dict[str, tuple[int, int]], block: str) -> _Attention | None:
    """The attention whose projections are `parent`'s linear children, if they are one."""
    from_hidden = [n for n, (i, _) in kids.items() if i == d]
    reads = {i for i, _ in kids.values()}
    # a fused qkv's sibling `o` reads the attention width (a fused GLU's `down` reads half its output)
    fused = [n for n in from_hidden if kids[n][1] > width and (kids[n][1] - width) % (2 * head_dim) == 0
             and kids[n][1] not in reads and any(dims == (width, d) for dims in kids.values())]
    if fused:
        projections = {"qkv": fused[0]}
    elif len(from_hidden) >= 3:
        projections = {}
        for role in ("q", "k", "v"):
            named = [n for n in from_hidden if _NAMED[role].fullmatch(_last(n))]
            if len(named) == 1:
                projections[role] = named[0]
    else:
        return None
    taken = set(projections.values())
    rest = [n for n, (_, o) in kids.items() if o == d and n not in taken]
    if len(rest) == 1:
        return _Attention(parent, parent, projections, rest[0])
    region = _parent(parent)
    while _within(region, block) and region != block:   # o in an enclosing module (BERT attention.output)
        outs = [n for n, (i, o) in linears.items() if _within(n, region) and not _within(n, parent)
                and (i, o) == (width, d)]
        if outs:
            return _Attention(parent, region, projections, outs[0])
        region = _parent(region)
    return _Attention(parent, parent, projections, None)


def block_experts(block: str, names: dict[str, nn.Module], d: int) -> dict[str, list[str]]:
    """Role (up, down) → the fused 3-D expert parameters inside one block, in nn.Linear layout [E, out, in].

    `down` is [E, d, I]; `up` is a sibling [E, I or 2I, d] (2I: gate and up fused) with the same E.
    """
    found: dict[str, list[str]] = {"up": [], "down": []}
    for name, module in names.items():
        if not name.startswith(block + "."):
            continue
        tensors = [*module.named_parameters(recurse=False),  # and those under a parametrisation
                   *((p, stack.original) for p, stack in getattr(module, "parametrizations", {}).items())]
        params = {p: t.shape for p, t in tensors if t.dim() == 3}
        downs = [p for p, (e, o, i) in params.items() if o == d and i != d]
        ups = [p for p, (e, o, i) in params.items() if i == d and p not in downs
               and any(params[x][0] == e and o in (params[x][2], 2 * params[x][2]) for x in downs)]
        if ups:
            found["up"] += [f"{name}.{p}" for p in ups]
            found["down"] += [f"{name}.{p}" for p in downs]
    return found


def block_roles(block: str, names: dict[str, nn.Module], d: int, width: int, head_dim: int) -> dict[str, list[str]]:
    """Role → module names inside one block (see the module docstring for the rules)."""
    linears = {n: linear_dims(m) for n, m in names.items() if n.startswith(block + ".") and is_linear(m)}
    roles: dict[str, list[str]] = {r: [] for r in ROLES}
    attentions: list[_Attention] = []
    for parent in dict.fromkeys(_parent(n) for n in linears):
        if any(_within(parent, a.region) for a in attentions):
            continue
        kids = {n: dims for n, dims in linears.items() if _parent(n) == parent}
        found = _attention(parent, kids, d, width, head_dim, linears, block)
        if found is not None:
            attentions.append(found)
    for a in attentions:
        for role, name in a.projections.items():
            roles[role].append(name)
        if a.o is not None:
            roles["o"].append(a.o)
    if attentions:
        roles["attn"].append(attentions[0].container)
    rest = {n: dims for n, dims in linears.items() if not any(_within(n, a.region) for a in attentions)}
    downs = [n for n, (i, o) in rest.items() if o == d and i != d
             and any(dims in ((d, i), (d, 2 * i)) for dims in rest.values())]
    ins = [n for n, (i, o) in rest.items() if i == d and any(o in (rest[x][0], 2 * rest[x][0]) for x in downs)]
    gates = [n for n in ins if _NAMED["gate"].fullmatch(_last(n))] if len(ins) > len(downs) else []
    roles["gate"], roles["up"], roles["down"] = gates, [n for n in ins if n not in gates], downs
    experts = [_parent(_parent(n)) for n in block_experts(block, names, d)["down"]]  # the MoE blocks
    if downs or experts:
        mlp = _common_scope(ins + downs + experts)
        if mlp != block:
            roles["ffn_in"] = roles["ffn_out"] = [mlp]
        else:
            first = ins[0][len(block) + 1:].split(".")[0]
            roles["ffn_in"], roles["ffn_out"] = [f"{block}.{first}"], downs
    return roles


def _common_scope(names: list[str]) -> str:
    """The innermost module holding all of `names` (two or more sibling or cousin linears)."""
    common = []
    for level in zip(*(n.split(".") for n in names)):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


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
        self.names = dict(model.named_modules())
        self.stacks = find_blocks(self.names)
        hidden, heads = self._sizes()
        head_dim = _config_value(config, "head_dim", "d_kv", default=hidden // heads)
        self.by_role = self._derive(hidden, heads * head_dim, head_dim)
        self.experts = self._derive_experts(hidden)
        self.geometry = self._geometry(hidden, heads, head_dim)

    def _sizes(self) -> tuple[int, int]:
        c = self.config
        hidden = _config_value(c, "hidden_size", "d_model", "n_embd", "dim")
        heads = _config_value(c, "num_attention_heads", "num_heads", "n_head", "n_heads")
        if hidden is None or heads is None:
            raise UnsupportedModelError(
                f"cannot read hidden size / head count from {type(c).__name__}; "
                "set hidden_size and num_attention_heads on the config"
            )
        return hidden, heads

    def _derive(self, hidden: int, width: int, head_dim: int) -> dict[str, list[str]]:
        """Role → module names, from the blocks; from name patterns when there are none."""
        if not self.stacks:
            by_name = {role: [n for n in self.names if n and re.search(r"(^|\.)" + pattern + "$", n)]
                       for role, pattern in _BY_NAME.items()}
            return {role: found for role, found in by_name.items() if found}
        out: dict[str, list[str]] = {r: [] for r in ROLES}
        for block in (b for stack in self.stacks for b in stack):
            for role, found in block_roles(block, self.names, hidden, width, head_dim).items():
                out[role] += found
        return {role: found for role, found in out.items() if found}

    def _derive_experts(self, hidden: int) -> dict[str, list[str]]:
        """Role (up, down) → fused 3-D expert parameter names (`module.param`), from the blocks."""
        out: dict[str, list[str]] = {}
        for block in (b for stack in self.stacks for b in stack):
            for role, found in block_experts(block, self.names, hidden).items():
                out.setdefault(role, []).extend(found)
        return {role: found for role, found in out.items() if found}

    def _geometry(self, hidden: int, heads: int, head_dim: int) -> Geometry:
        c = self.config
        enc_dec = bool(getattr(c, "is_encoder_decoder", False))
        layers = (_config_value(c, "num_decoder_layers", "decoder_layers", "num_layers") if enc_dec
                  else _config_value(c, "num_hidden_layers", "n_layer", "num_layers", "n_layers"))
        attn = self.by_role.get("attn", [])
        causal = bool(attn) and getattr(self.names[attn[-1]], "is_causal", False) is True
        return Geometry(
            model_type=self.model_type, hidden=hidden, layers=layers, heads=heads,
            kv_heads=self._kv_heads(heads, head_dim), head_dim=head_dim,
            vocab=_config_value(c, "vocab_size", default=0), encoder_decoder=enc_dec,
            decoder_only=not enc_dec and (causal or bool(getattr(c, "is_decoder", False))),
        )

    def _kv_heads(self, heads: int, head_dim: int) -> int:
        """Key/value heads, read off the last self-attention's projections (Falcon's config overstates them)."""
        kv = _config_value(self.config, "num_key_value_heads", default=heads)
        attn = self.by_role.get("attn", [])
        if not attn:
            return kv
        for role in ("k", "qkv"):
            names = [n for n in self.by_role.get(role, []) if _parent(n) == attn[-1]]
            if names:
                out = linear_dims(self.names[names[0]])[1]
                return out // head_dim if role == "k" else (out // head_dim - heads) // 2
        return kv

    def default_targets(self, kind: str) -> tuple[str, ...]:
        """What a config with `targets=None` adapts: q and v, or the fused qkv where q and v are one module."""
        separate = ("k", "v", "down") if kind == "ia3" else ("q", "v")
        if "qkv" in self.by_role and not all(r in self.by_role for r in separate[:2]):
            return ("qkv", "down") if kind == "ia3" else ("qkv",)
        return separate

    def roles(self) -> list[str]:
        return sorted(self.by_role)

    def describe(self) -> str:
        """The roles found, with a count and one example each, for error messages."""
        found = ", ".join([f"{r} ×{len(n)} (e.g. {n[0]})" for r, n in self.by_role.items()] +
                          [f"expert {r} ×{len(n)} (e.g. {n[0]})" for r, n in self.experts.items()])
        stacks = [_parent(s[0]) or "<root>" for s in self.stacks]
        return f"repeated blocks at {stacks or 'none found'}; roles found: {found or 'none'}"

    def find(self, target: str, linear: bool = False) -> list[str]:
        """Module names for a role or a module-name suffix; [] when nothing matches."""
        found = list(self.by_role.get(target, [])) if target in ROLES else [
            n for n in self.names if n == target or n.endswith("." + target)]
        if linear:
            found = [n for n in found if is_linear(self.names[n])]
        return found

    def find_experts(self, target: str) -> list[str]:
        """Fused 3-D expert parameter names for a role (up, down) or a parameter-name suffix."""
        if target in ROLES:
            return list(self.experts.get(target, []))
        return [n for found in self.experts.values() for n in found if n == target or n.endswith("." + target)]

    def resolve(self, targets: tuple[str, ...], linear: bool = False, what: str = "module",
                experts: bool = False) -> dict[str, list[str]]:
        """Map each target to its module names (and, with `experts`, fused expert parameter names: see
        `find_experts`), or fail listing what exists."""
        resolved = {t: self.find(t, linear) + (self.find_experts(t) if experts else []) for t in targets}
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
        if not self.by_role.get(role):
            raise UnsupportedModelError(
                f"{what} needs the {role!r} sites, which pelthub cannot find in this {type(self.model).__name__} "
                f"(model_type={self.model_type!r}): {self.describe()}. Roles are read off the blocks' linear "
                "layers (see pelthub.sites); choose a module kind that uses the roles found"
            )
        return self.by_role[role]

    def prefix_layers(self, what: str) -> list[str]:
        """The self-attention modules a prefix reaches (the decoder's for encoder-decoder models), in order.

        Raises UnsupportedModelError when there is not one per prefixed layer or their
        forward takes no key/value cache (DistilBERT, DeBERTa-v2, MPNet), so a prefix
        could not reach them.
        """
        names = self.require("attn", what)
        if self.geometry.encoder_decoder:
            names = [n for n in names if _within(n, _parent(self.stacks[-1][0]))]
        if len(names) != self.geometry.layers:
            raise UnsupportedModelError(f"{what} found {len(names)} self-attention modules for "
                                        f"{self.geometry.layers} prefixed layers: {self.describe()}")
        for name in names:
            params = inspect.signature(type(self.names[name]).forward).parameters
            if not any(p in params for p in _CACHE_PARAMS):
                raise UnsupportedModelError(
                    f"{what} passes keys and values through the attention cache, but "
                    f"{type(self.names[name]).__name__}.forward ({name}) takes no cache (its parameters: "
                    f"{[p for p in params if p != 'self']}), so no prefix can reach it on model_type="
                    f"{self.model_type!r}. Use a soft prompt (ph.Prompt), LoRA or adapters here; {self.describe()}")
        return names

    def fingerprint(self) -> dict[str, Any]:
        """Architecture identity of the backbone: model type plus every parameter's name and shape.

        Task heads are left out (`model.base_model`), so one backbone with heads of different
        label counts shares a fingerprint; any change of sizes or layers changes it.
        """
        backbone = getattr(self.model, "base_model", self.model)
        shapes = sorted((_unparametrized(n), list(_logical_shape(p))) for n, p in backbone.named_parameters())
        body = json.dumps({"model_type": self.model_type, "params": shapes}, sort_keys=True)
        g = self.geometry
        return {"sha256": hashlib.sha256(body.encode()).hexdigest(), "model_type": g.model_type,
                "hidden": g.hidden, "layers": g.layers, "heads": g.heads,
                "vocab": g.vocab or None}  # image and audio encoders (ViT, CLIP vision) have no vocabulary


def _logical_shape(p: nn.Parameter) -> tuple[int, ...]:
    """A weight's shape before quantization (bitsandbytes packs a 4-bit (out, in) weight into (out * in / 2, 1)),
    so modules trained on a 4-bit base load onto the full-precision one and back."""
    return getattr(getattr(p, "quant_state", None), "shape", None) or p.shape


# What FSDP1 (`FullyShardedDataParallel`, wrapping layers in place) inserts into parameter names;
# tests/test_fsdp.py fails if the name changes.
FSDP1_WRAPPED = "_fsdp_wrapped_module."


def _unparametrized(name: str) -> str:
    """A parameter's name as it is without torch parametrisations (LN-tuning adds them) and FSDP1's wrappers."""
    return name.replace(FSDP1_WRAPPED, "").replace("parametrizations.", "").replace(".original", "")
