"""Arrow (Ostapenko et al. 2024): zero-shot routing of every token over a library of trained LoRAs.

At each adapted linear layer, for the sources e that adapt it (ΔW_e = s_e·B_e·A_e, s_e = α_e/r_e):

    p_e      = top right singular vector of ΔW_e       (∈ R^in, unit; computed once, at build)
    score_e  = |h · p_e|                               (per token h; |·| because p_e's sign is arbitrary)
    K(h)     = the top_k sources by score               (top_k capped at the sources of that layer)
    w_e      = softmax_{e∈K(h)}(score_e / temperature)
    y        = W₀h + Σ_{e∈K(h)} w_e · s_e · B_e A_e h

Sparse: the chosen sources' rank rows form a sparse mask over the stacked sources, and the update
is a sampled dense matmul then a sparse × dense one (`sparse_update`): each token computes only
its top_k sources, so a forward costs about top_k LoRAs plus the scores (h against E prototypes),
in a fixed number of kernel calls whatever the library size. PEFT's `create_arrow_model`
computes every source for every token instead.

`gks=[general LoRAs]` is GenKnowSub (as PEFT's `use_gks`): before the prototypes are taken, each
source's A and B at a layer are reduced by the means of the general LoRAs' A and B there
(A_e ← A_e − mean_g A_g, B_e ← B_e − mean_g B_g; the source's own scale s_e stays), so every
general LoRA must adapt the source's layers with the source's rank.

The config (`ArrowConfig`) is data: source names (registry refs, saved directories, or labels
of modules given in memory) and, once built, `layout` (which sources adapt which layer, with
their ranks), so a saved Arrow model rebuilds empty and loads its tensors stand-alone.
`Arrow(sources, ...)` pairs the config with the in-memory sources (by reference, never copied
until built) and the registry as build inputs (`Sourced`). The built module holds the frozen
sources (A and (s·B)ᵀ, padded to the layer's largest rank) and the cached prototypes; only `log_temperature` can train (`learn_temperature=True`).
Prototypes come from the registry's stored signatures when a registry ref has one.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ..composition.blocks import load_single
from ..errors import ConfigError, IncompatibleModuleError
from ..model.modular import ModularModel
from ..modules.base import CallContext, Handle, PeltModule, add_to_output, site_key, site_name
from ..modules.config import MAX_SIZE, ModuleConfig, Sourced, flag, positive_int, positive_number
from ..modules.lora import LoRAModule, top_right_singular
from ..registry import parent_entries, require_registry, signatures
from ..sites import Sites, linear_dims

Weights = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # site → (A (r, in), B (out, r), scale)
Layout = tuple[tuple[str, tuple[tuple[int, int], ...]], ...]   # (site, ((source index, rank), ...)), ...


def Arrow(sources: Any, top_k: int = 3, temperature: float = 1.0, gks: Any = None, learn_temperature: bool = False,
          registry: Any = None) -> Sourced:
    """An Arrow block for `compose`: the config over `sources`, with the in-memory ones as build inputs.

    sources: LoRA modules, ModularModels holding one LoRA, saved directories or registry refs (a
    list, or a {name: source} mapping); in memory they are named "source0", ... unless mapped.
    top_k: sources mixed per token. temperature: of the softmax over the chosen scores.
    gks: general LoRAs for GenKnowSub, given like `sources` (None: no subtraction).
    learn_temperature: make the temperature a trainable parameter. registry: resolves refs
    (`compose(registry=...)` also does).
    """
    names, given = _split("sources", "source", sources)
    general, given_gks = _split("gks", "general", gks) if gks is not None else (None, {})
    config = ArrowConfig(sources=names, top_k=top_k, temperature=temperature, gks=general,
                         learn_temperature=learn_temperature)
    return Sourced(config, {"given": {**given, **given_gks}, "registry": registry})


@dataclass(frozen=True)
class ArrowConfig(ModuleConfig):
    """Config of an Arrow router over trained LoRAs: pure data (build it through `Arrow`).

    sources, gks: names of the sources and general LoRAs (see `Arrow`); top_k, temperature,
    learn_temperature: see `Arrow`. layout: filled at build.
    """

    kind: ClassVar[str] = "arrow"
    sources: tuple[str, ...] = ()
    top_k: int = 3
    temperature: float = 1.0
    gks: tuple[str, ...] | None = None
    learn_temperature: bool = False
    layout: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", _layout(self.layout))
        super().__post_init__()

    def validate(self) -> None:
        for field, names in (("sources", self.sources), ("gks", self.gks or ())):
            if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
                raise ConfigError(f"Arrow.{field} must have distinct non-empty names, got {list(names)}")
        if not self.sources:
            raise ConfigError("Arrow.sources must name at least one trained LoRA (module, model or registry ref)")
        if self.gks is not None and not self.gks:
            raise ConfigError("Arrow.gks must list at least one general LoRA, or be None for no GenKnowSub")
        if set(self.sources) & set(self.gks or ()):
            raise ConfigError(f"Arrow: {sorted(set(self.sources) & set(self.gks or ()))} are both sources and gks")
        positive_int("Arrow", "top_k", self.top_k)
        positive_number("Arrow", "temperature", self.temperature, math.inf)
        flag("Arrow", "learn_temperature", self.learn_temperature)

    def build(self, base: nn.Module, sites: Sites, init: bool = True, given: Mapping[str, Any] | None = None,
              registry: Any = None, **_: object) -> "ArrowModule":
        """The module; `given` ({name: in-memory source}) and `registry` (for refs) give the sources."""
        if not init:
            if self.layout is None:
                raise ConfigError("an Arrow config without `layout` cannot be rebuilt empty; it is filled when "
                                  "the Arrow model is first built from its sources")
            dims = {site: _site_dims(sites, site, "saved Arrow model") for site, _ in self.layout}
            return ArrowModule(self, dims)
        given = dict(given or {})
        loras = [self._weights(name, given, registry, base, sites) for name in self.sources]
        if self.gks is not None:
            loras = general_knowledge_subtracted(self.sources, loras, [self._weights(g, given, registry, base, sites)
                                                                       for g in self.gks])
        layout = tuple((site, tuple((i, lora[site][0].shape[0]) for i, lora in enumerate(loras) if site in lora))
                       for site in dict.fromkeys(s for lora in loras for s in lora))
        module = ArrowModule(self.replace(layout=layout), {site: _site_dims(sites, site, "Arrow") for site, _ in layout})
        refs = [n for n in (*self.sources, *(self.gks or ())) if n not in given and not Path(n).is_dir()]
        stored = [signatures.stored(registry, n) if n in refs and registry is not None else None
                  for n in self.sources] if self.gks is None else [None] * len(loras)
        module.load_sources(loras, stored)
        module.resolved = parent_entries(registry, refs)
        return module

    def _weights(self, name: str, given: Mapping[str, Any], registry: Any, base: nn.Module, sites: Sites) -> Weights:
        """A source's per-site (A, B, scale), checked against this base model."""
        value = given.get(name, name)
        if isinstance(value, str) and not Path(value).is_dir():
            registry = require_registry(registry, f"Arrow source {name!r}")
        try:
            module = value if isinstance(value, LoRAModule) else load_single(value, base, registry)
        except IncompatibleModuleError as e:
            raise IncompatibleModuleError(f"Arrow source {name!r} does not fit this base model: {e}") from None
        if not isinstance(module, LoRAModule):
            raise ConfigError(f"Arrow source {name!r} is a {module.config.kind} module; Arrow routes over LoRAs")
        out: Weights = {}
        for key, layer in module.layers.items():
            site = site_name(key)
            want = _site_dims(sites, site, f"Arrow source {name!r}")
            if (layer.lora_a.shape[1], layer.lora_b.shape[0]) != want:
                raise IncompatibleModuleError(
                    f"Arrow source {name!r} adapts {site} as ({layer.lora_a.shape[1]} → {layer.lora_b.shape[0]}) but "
                    f"this base model's {site} is ({want[0]} → {want[1]}); use LoRAs trained on this base model")
            out[site] = (layer.lora_a.detach().float().cpu().clone(), layer.lora_b.detach().float().cpu().clone(),
                         float(layer.scale))
        return out


class ArrowLinear(nn.Module):
    """The sources of one linear layer: A (E, r, in) and (s·B)ᵀ (E, r, out), zero-padded to the largest
    rank r, the true ranks, and the prototypes (E, in); all frozen."""

    def __init__(self, in_features: int, out_features: int, ranks: tuple[int, ...]):
        super().__init__()
        e, r = len(ranks), max(ranks)
        self.ranks = ranks
        self.lora_a = nn.Parameter(torch.zeros(e, r, in_features), requires_grad=False)
        self.lora_b = nn.Parameter(torch.zeros(e, r, out_features), requires_grad=False)
        self.prototypes = nn.Parameter(torch.zeros(e, in_features), requires_grad=False)

    def route(self, h: torch.Tensor, top_k: int, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen sources (t, k) and their weights (t, k) for tokens h (t, in)."""
        scores = (h @ self.prototypes.T).abs()
        top, chosen = scores.topk(min(top_k, len(self.ranks)), dim=1)
        return chosen, torch.softmax(top / temperature, dim=1)

    def forward(self, x: torch.Tensor, top_k: int, temperature: torch.Tensor) -> torch.Tensor:
        lead, h = x.shape[:-1], x.reshape(-1, x.shape[-1]).to(self.lora_a.dtype)
        if h.shape[0] == 0:
            return h.new_zeros(*lead, self.lora_b.shape[2])
        chosen, weights = self.route(h, top_k, temperature)
        update = dense_update if torch.compiler.is_compiling() else sparse_update  # dynamo traces no sparse tensors
        return update(h, chosen, weights, self.lora_a, self.lora_b).reshape(*lead, -1)


def sparse_update(h: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, a: torch.Tensor,
                  b: torch.Tensor) -> torch.Tensor:
    """Σ_j weights[t, j]·(s·B_e)(A_e h_t) with e = chosen[t, j], for tokens h (t, in), A (E, r, in), (s·B)ᵀ (E, r, out).

    Stacking the sources' rank rows, A (E·r, in) and (s·B)ᵀ (E·r, out), the update is
    (M ⊙ (h Aᵀ)) (s·B)ᵀ for the mask M (t, E·r) that keeps the r rows of each chosen source: a sampled
    dense matmul (only the kept entries are computed) then a sparse × dense one, three kernel calls
    whatever the library size, and a source no token chose is never read. Half precision runs in
    float32 (the CPU sparse kernels have no half types).
    """
    dtype = h.dtype
    if dtype in (torch.float16, torch.bfloat16):
        h, a, b, weights = h.float(), a.float(), b.float(), weights.float()
    (t, k), r = chosen.shape, a.shape[1]
    chosen, order = chosen.sort(dim=1)                               # CSR wants each row's columns ascending
    cols = (chosen[..., None] * r + torch.arange(r, device=h.device)).reshape(-1)
    crow = torch.arange(0, t * k * r + 1, k * r, device=h.device)
    mask = torch.sparse_csr_tensor(crow, cols, h.new_ones(cols.numel()), (t, a.shape[0] * r), check_invariants=False)
    z = torch.sparse.sampled_addmm(mask, h, a.reshape(-1, a.shape[2]).T, beta=0.0).values()
    z = z * weights.gather(1, order).repeat_interleave(r, 1).reshape(-1)
    update = torch.sparse_csr_tensor(crow, cols, z, mask.shape, check_invariants=False)
    return (update @ b.reshape(-1, b.shape[2])).to(dtype)


def dense_update(h: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor) -> torch.Tensor:
    """`sparse_update` with dense matmuls, for torch.compile: (W ⊙ (h Aᵀ)) (s·B)ᵀ where W (t, E·r) holds
    weights[t, j] on the r rows of source chosen[t, j] and 0 elsewhere. Every source is read, so E/k
    times `sparse_update`'s FLOPs on the update (small next to the base layer at r ≪ d)."""
    w = h.new_zeros(h.shape[0], a.shape[0]).scatter(1, chosen, weights.to(h.dtype))
    z = (h @ a.reshape(-1, a.shape[2]).T) * w.repeat_interleave(a.shape[1], 1)
    return z @ b.reshape(-1, b.shape[2])


@functools.cache
def _acknowledge_sparse_beta() -> None:
    """torch warns once per process that sparse CSR tensors are in beta; pelthub's use of them is
    internal and tested, so the first CSR tensor is made here, at build, with that warning ignored."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        torch.sparse_csr_tensor(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1), (1, 1), check_invariants=False)


class ArrowModule(PeltModule):
    """Built Arrow router: one `ArrowLinear` per adapted layer and the (log) temperature."""

    def __init__(self, config: ArrowConfig, dims: dict[str, tuple[int, int]]):
        super().__init__()
        _acknowledge_sparse_beta()
        self.config = config
        self.resolved: list[dict[str, Any]] = []  # {"ref", "sha256"} of the sources a registry gave at build
        self.layers = nn.ModuleDict({site_key(site): ArrowLinear(*dims[site], tuple(r for _, r in entries))
                                     for site, entries in config.layout})
        self.log_temperature = nn.Parameter(torch.tensor(math.log(config.temperature)),
                                            requires_grad=config.learn_temperature)

    def install(self, base: nn.Module, ctx: CallContext) -> list[Handle]:
        return [add_to_output(base.get_submodule(site_name(key)), self._delta(layer), ctx)
                for key, layer in self.layers.items()]

    def _delta(self, layer: ArrowLinear) -> Any:
        return lambda x: layer(x, self.config.top_k, self.log_temperature.exp())

    @torch.no_grad()
    def load_sources(self, loras: list[Weights], stored: list[dict[str, torch.Tensor] | None]) -> None:
        """Copy the sources' A and s·B in and take each prototype (stored, or by SVD)."""
        for site, entries in self.config.layout:
            layer = self.layers[site_key(site)]
            for j, (i, r) in enumerate(entries):
                a, b, scale = loras[i][site]
                layer.lora_a[j, :r] = a
                layer.lora_b[j, :r] = (b * scale).T
                saved = (stored[i] or {}).get(site)
                layer.prototypes[j] = saved if saved is not None else top_right_singular(a, b)

    def parents(self) -> list[dict[str, Any]]:
        """{"ref", "sha256"} of the sources and general LoRAs that were registry modules at build,
        for `compose`'s `model.parents`."""
        return list(self.resolved)

    def routing(self, site: str, h: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(source names, chosen (t, k) indices into them, weights (t, k)) at `site` for tokens h (t, in)."""
        entries = dict(self.config.layout)[site]
        chosen, weights = self.layers[site_key(site)].route(h, self.config.top_k, self.log_temperature.exp())
        return [self.config.sources[i] for i, _ in entries], chosen, weights


def general_knowledge_subtracted(names: tuple[str, ...], loras: list[Weights], general: list[Weights]) -> list[Weights]:
    """GenKnowSub as PEFT's use_gks: A ← A − mean_g A_g, B ← B − mean_g B_g at every site of a source."""
    out = []
    for name, lora in zip(names, loras):
        fixed: Weights = {}
        for site, (a, b, scale) in lora.items():
            at = [g.get(site) for g in general]
            if any(g is None or g[0].shape != a.shape or g[1].shape != b.shape for g in at):
                ranks = [None if g is None else g[0].shape[0] for g in at]
                raise ConfigError(f"Arrow gks: every general LoRA must adapt {site} with the rank of source {name!r} "
                                  f"({a.shape[0]}); their ranks there are {ranks} (None: not adapted)")
            fixed[site] = (a - torch.stack([g[0] for g in at]).mean(0), b - torch.stack([g[1] for g in at]).mean(0),
                           scale)
        out.append(fixed)
    return out


def arrow_module(model: nn.Module) -> ArrowModule:
    """The one ArrowModule of a ModularModel (or the module itself)."""
    if isinstance(model, ArrowModule):
        return model
    found = [m for m in model.modules() if isinstance(m, ArrowModule)]
    if len(found) != 1:
        raise ConfigError(f"expected one Arrow module in the model, found {len(found)}; pass the module itself")
    return found[0]


def _split(field: str, prefix: str, sources: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Names of `sources` (a list, or a {name: source} mapping) and the in-memory ones, by reference."""
    if isinstance(sources, (str, os.PathLike, nn.Module)):
        raise ConfigError(f"Arrow.{field} must be a list (or {{name: source}} mapping) of LoRAs, "
                          f"got one {type(sources).__name__}")
    items = list(sources.items()) if isinstance(sources, Mapping) else [
        (os.fspath(s) if isinstance(s, (str, os.PathLike)) else f"{prefix}{i}", s) for i, s in enumerate(sources)]
    bad = [type(s).__name__ for _, s in items if not isinstance(s, (str, os.PathLike, LoRAModule, ModularModel))]
    if bad:
        raise ConfigError(f"Arrow.{field} takes LoRA modules, ModularModels holding one LoRA, saved directories or "
                          f"registry refs; got {bad}")
    return tuple(n for n, _ in items), {n: s for n, s in items if not isinstance(s, str) or s != n}


def _layout(value: Any) -> Layout | None:
    """The layout as nested tuples (JSON gives lists): site names, source indices and ranks as given, never cast."""
    if value is None:
        return None
    try:
        layout = tuple((site, tuple((i, r) for i, r in entries)) for site, entries in value)
    except (TypeError, ValueError):
        layout = None
    ok = layout is not None and all(isinstance(site, str) and site for site, _ in layout) and all(
        type(i) is int and type(r) is int and 0 <= i < MAX_SIZE and 0 < r <= MAX_SIZE  # 1.9 is no index
        for _, entries in layout for i, r in entries)
    if not ok:
        raise ConfigError(f"Arrow.layout must be [[site, [[source index, rank], ...]], ...] with integer indices "
                          f"and ranks from 1 to {MAX_SIZE:,}, got {value!r:.120}")
    return layout


def _site_dims(sites: Sites, site: str, what: str) -> tuple[int, int]:
    module = sites.names.get(site)
    if module is None:
        raise IncompatibleModuleError(f"{what} adapts {site}, which this {type(sites.model).__name__} does not have; "
                                      "use LoRAs trained on this base model")
    return linear_dims(module)
