"""ATTEMPT (Asai et al. 2022): an input-dependent attentional mixture of soft prompts.

Frozen source prompts P_1..P_S (each trained by prompt tuning on a source
task) and a trainable target prompt P_tgt (one per task when `tasks` is set)
are mixed per example::

    x̂   = pool_t(X)                              (B, d)   X: input embeddings, padding masked
    z   = LN(W_up · SiLU(W_down · x̂))            (B, d)   the "router"
    p̂_j = pool_t(P_j)  for j ∈ {1..S, tgt}       (S+1, d) keys; the sources' are frozen constants
    a   = softmax_j(c · cos(z, p̂_j − p̄))         (B, S+1) default; p̄ = mean_j p̂_j, c = `COSINE_SCALE` = 2
    a   = softmax_j(p̂_j · z / T)                 (B, S+1) the paper's, with `temperature=` T
    P_inst = P_tgt + Σ_j a_j P_j                 (B, L, d) prepended like a plain soft prompt

With no sources a = [1] and P_inst = 2·P_tgt; as T → ∞ the weights become
uniform. `last_entropy()` reports how far from uniform the latest call
attended. Trainable: W_down (d×m), W_up (m×d), the LayerNorm (2d) and L·d per
target prompt.

Scores (deviation from the paper, `temperature="cosine"`, the default). The
paper's dot product over T = d·e suits T5's large embeddings. Measured on
MiniLM (d = 384) in the demo's setting (the top 3 source prompts of length
10, sentiment_hotels, 64 examples, 40 AdamW steps at lr 0.05):
- T = d·e = 1044 leaves logits of spread ≈ 0.007: uniform attention (entropy
  0.997 of the maximum after training), and T = ∞ gives the same accuracy.
- T = the keys' spread √(mean_j ‖p̂_j − p̄‖²) ≈ 4.6 (the previous default)
  starts the scaled logits at std ≈ 1, but a z turned towards one key scales
  them by up to √d ≈ 20: after 5 steps every input put weight 1.000 on the
  same source (entropy 0.002), the softmax saturated (its gradient a(1 − a)
  vanishes), and it stayed there (entropy 0.000 after 40 steps; accuracy
  0.551 against 0.645 with T = ∞ and 0.691 for plain prompt tuning, seed 0).
  A router lr of 1e-3 instead of 0.05 collapsed as well (by step 20: ‖W_down‖
  moved from 5.76 to 5.85, yet tilting z by 0.15 rad towards one key moved
  its logit by 29 = 6 T), so the learning rate is not the cause; the reach
  of the logits is.
The cosine scores lie in [−c, c] whatever the norms of z and of the keys (the
LayerNorm's gain and bias, or the target key, which grew from 1.9 to 11.5 in
those 40 steps), so no weight exceeds e^{2c}/(e^{2c} + S) (0.95 for three
sources and the target) and the gradient always reaches the router. Centring
the keys on their mean p̄ removes what all candidates share: it shifts every
dot-product logit alike, but would dominate a cosine. c = 2 by measurement on
the task of tests/test_evidence_guards.py whose two groups of inputs need
different sources (8 router inits; routed = accuracy ≥ 0.9, entropy in
(0.2, 0.8), the groups' largest weights on different candidates): c = 1.5
routed 6, c = 2 and 3 all 8 (2 keeps a margin on both sides: entropies
0.58-0.72 against 0.30-0.61 for 3), c = 4 3, c = 8 none; the previous
default none (one-hot, entropy ≤ 0.07, in all 8; every input on one
candidate in 5). In
the demo's setting (5 seeds, its top 3 sources: topic_news, pair_paraphrase,
form_question, unrelated to the target) the entropy after training is
0.50-0.80 and the accuracy 0.642 on average (previous default 0.567 with
entropy 0.000, T = ∞ 0.613, plain prompt tuning 0.604). Over three related
sources (sentiment_movies, sentiment_products, topic_news; 3 seeds) it is
0.733 (entropy 0.56-0.58), T = ∞ 0.677, and the previous default's one-hot
pick of sentiment_movies 0.784: the bound costs where one source alone is
the answer. On MiniLM the weights hardly vary between inputs (their spread
across test inputs is ≤ 0.002 after training, ≤ 0.007 at init): the max-pooled
inputs x̂ of different reviews have cosine 0.93 with each other.
`temperature=None` is the paper's T = d·e and a number sets T,
both on the dot product.

The config (`AttentionMixConfig`) is data: source names (registry refs
"name@version" or labels) and the fields below. `AttentionMix(sources, ...)`
pairs it with the prompt values as build inputs (`Sourced`): values given
directly (tensors, PromptModules or ModularModels holding one prompt; a
mapping names them, otherwise they are called "source0", ...), and names
resolved through `registry=` (of AttentionMix or of `compose`) with
`registry.load(ref, base, heads=False)` when the module is built. Once built, the
sources are frozen parameters of the module, so `save_pretrained` writes them
to modules.safetensors and a saved ATTEMPT model loads stand-alone;
`parents()` lists the sources that are registry modules (ref and card
digest), for the registry's dependency graph.

All sources must have the target's length L, else building raises
ConfigError. With `fit_sources=True` a longer source is truncated to its
first L tokens and a shorter one zero-padded at the end; its key p̂_j is
pooled over the tokens it contributes (padding excluded).

Deviations from the reference code: padding is masked when pooling the input
(`mask_padding=False` restores the reference), the LayerNorm trains, and
sources' keys are computed once instead of every step (they are frozen).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, RoutingError
from ..model.modular import ModularModel
from ..sites import Sites
from ..modules.base import CallContext, PeltModule
from ..modules.config import MAX_TASKS, ModuleConfig, Sourced, config_from_dict, flag, one_of, positive_int, positive_number
from ..modules.prompt import Prompt, PromptModule, initial_prompt
from ..registry import parent_entries

POOLS = ("max", "mean")
TARGET = "<target>"
COSINE = "cosine"
COSINE_SCALE = 2.0  # c: the bound of the cosine logits (see the module docstring for the measurement)


def AttentionMix(sources: Any = (), registry: Any = None, **fields: Any) -> Sourced:
    """An ATTEMPT block for `compose`: the config over `sources` with their prompt values as build inputs.

    sources: names (registry refs), or the prompts themselves (tensors, PromptModules, models
    holding one prompt); a list or a {name: prompt} mapping. registry: resolves the names
    when the module is built (`compose(registry=...)` also does). fields: see `AttentionMixConfig`.
    """
    names, values = _split_sources(sources)
    return Sourced(AttentionMixConfig(sources=names, **fields), {"values": values, "registry": registry})


@dataclass(frozen=True)
class AttentionMixConfig(ModuleConfig):
    """Config of an ATTEMPT module: pure data (build it through `AttentionMix`).

    sources: source names (see the module docstring). target: the Prompt config of the target
    prompt(s) (length and init). temperature: "cosine" (default) scores by c·cosine to the
    centred keys (see the module docstring); None is the paper's dot product over T = d·e,
    a number is that T. pool: "max"
    (paper) or "mean" over tokens. mask_padding: ignore padded input positions
    when pooling. tasks: one target prompt per task, routed by `task_ids`.
    bottleneck: m of the attention module. init_from: a source name whose
    values start the target prompt(s) instead of `target.init`. fit_sources:
    truncate / zero-pad sources of another length instead of raising.
    """

    kind: ClassVar[str] = "attention_mix"
    sources: Any = ()
    target: Prompt = Prompt(length=20)
    temperature: float | str | None = COSINE
    pool: str = "max"
    mask_padding: bool = True
    tasks: tuple[str, ...] | None = None
    bottleneck: int = 100
    init_from: str | None = None
    fit_sources: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.sources, (str, torch.Tensor, nn.Module)):
            raise ConfigError("AttentionMix.sources must be a list of source names, got one "
                              f"{type(self.sources).__name__}")
        if isinstance(self.target, Mapping):
            object.__setattr__(self, "target", config_from_dict({"kind": "prompt", **self.target}))
        super().__post_init__()

    def validate(self) -> None:
        if (not isinstance(self.sources, tuple) or not all(isinstance(s, str) and s for s in self.sources)
                or len(set(self.sources)) != len(self.sources)):
            raise ConfigError(f"AttentionMix.sources must have distinct non-empty names, got {list(self.sources)}")
        if TARGET in self.sources:
            raise ConfigError(f"AttentionMix.sources may not use the reserved name {TARGET!r}")
        if not isinstance(self.target, Prompt):
            raise ConfigError("AttentionMix.target must be a Prompt config, e.g. Prompt(length=20), "
                              f"got {self.target!r}")
        if self.temperature is not None and self.temperature != COSINE:
            positive_number("AttentionMix", "temperature", self.temperature, math.inf)
        one_of("AttentionMix", "pool", self.pool, POOLS)
        flag("AttentionMix", "mask_padding", self.mask_padding)
        flag("AttentionMix", "fit_sources", self.fit_sources)
        positive_int("AttentionMix", "bottleneck", self.bottleneck)
        if self.tasks is not None and (not isinstance(self.tasks, tuple) or not 0 < len(self.tasks) <= MAX_TASKS
                                       or len(set(self.tasks)) != len(self.tasks)
                                       or not all(isinstance(t, str) and t for t in self.tasks)):
            raise ConfigError(f"AttentionMix.tasks must be a list of 1 to {MAX_TASKS:,} distinct task names, "
                              f"got {self.tasks!r:.120}")
        if self.init_from is not None and self.init_from not in self.sources:
            raise ConfigError(f"AttentionMix.init_from must name one of the sources {list(self.sources)}, "
                              f"got {self.init_from!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "target": self.target.to_dict()}

    def build(self, base: nn.Module, sites: Sites, tokenizer: Any = None, init: bool = True,
              values: Mapping[str, torch.Tensor] | None = None, registry: Any = None,
              **_: object) -> "AttentionMixModule":
        """The module; `values` ({name: (L, d)}) and `registry` (for the other names) give the sources."""
        embedding = base.get_input_embeddings().weight
        d, length, tasks = embedding.shape[1], self.target.length, len(self.tasks or ()) or 1
        values = dict(values or {})
        if not init:  # values come from a saved state
            sources = torch.zeros(len(self.sources), length, d)
            return AttentionMixModule(self, sources, torch.zeros(len(self.sources), d), torch.zeros(tasks, length, d))
        raw = [_source_values(name, values, registry, base, d) for name in self.sources]
        sources, keys = self._fit(raw, length, d)
        if self.init_from is not None:
            targets = sources[self.sources.index(self.init_from)].expand(tasks, -1, -1).clone()
        else:
            targets = torch.stack([initial_prompt(self.target, embedding, tokenizer) for _ in range(tasks)])
        module = AttentionMixModule(self, sources, keys, targets)
        module.resolved = parent_entries(registry, [n for n in self.sources if n not in values])
        return module

    def _fit(self, raw: list[torch.Tensor], length: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sources stacked to (S, L, d) and their keys (S, d), pooled over the tokens each contributes."""
        bad = {n: p.shape[0] for n, p in zip(self.sources, raw) if p.shape[0] != length}
        if bad and not self.fit_sources:
            raise ConfigError(f"AttentionMix sources {bad} (name: length) differ from the target length {length}; "
                              "use Prompt(length=...) matching them, or fit_sources=True to truncate / zero-pad")
        kept = [p[:length] for p in raw]
        keys = torch.stack([pool_tokens(p[None], None, self.pool)[0] for p in kept]) if kept else torch.zeros(0, d)
        padded = [torch.cat([p, p.new_zeros(length - p.shape[0], d)]) for p in kept]
        return (torch.stack(padded) if padded else torch.zeros(0, length, d)), keys


class AttentionMixModule(PeltModule):
    """Built ATTEMPT module: frozen `sources` (S, L, d) and `source_keys` (S, d), trainable
    `targets` (K, L, d) and `router` (down, SiLU, up, LayerNorm; its own lr group in `param_groups`).
    `temperature` is T of the dot-product scores, None under the default cosine scores."""

    def __init__(self, config: AttentionMixConfig, sources: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor):
        super().__init__()
        self.config = config
        d, m = targets.shape[-1], config.bottleneck
        self.sources = nn.Parameter(sources, requires_grad=False)
        self.source_keys = nn.Parameter(keys, requires_grad=False)
        self.targets = nn.Parameter(targets)
        self.router = nn.Sequential(nn.Linear(d, m, bias=False), nn.SiLU(), nn.Linear(m, d, bias=False),
                                    nn.LayerNorm(d))
        self.temperature = None if config.temperature == COSINE else float(config.temperature or d * math.e)
        self.resolved: list[dict[str, Any]] = []  # {"ref", "sha256"} of the sources a registry gave at build
        self._last: torch.Tensor | None = None

    @property
    def candidates(self) -> list[str]:
        """Names of the columns of `last_attention()`: the sources, then the target."""
        return [*self.config.sources, TARGET]

    def prompt(self, embeds: torch.Tensor, mask: torch.Tensor | None, ctx: CallContext) -> torch.Tensor:
        batch = embeds.shape[0]
        z = self.router(pool_tokens(embeds, mask if self.config.mask_padding else None, self.config.pool)
                        .to(self.targets.dtype))                                         # (B, d)
        target = self.targets[self._task_ids(ctx, batch)] if self.config.tasks else \
            self.targets.expand(batch, -1, -1)                                          # (B, L, d)
        keys = torch.cat([self.source_keys.expand(batch, -1, -1),
                          pool_tokens(target, None, self.config.pool)[:, None]], 1)    # (B, S+1, d)
        if self.temperature is None:
            scores = COSINE_SCALE * F.cosine_similarity(z[:, None], keys - keys.mean(1, keepdim=True), dim=-1)
        else:
            scores = (keys @ z[:, :, None])[..., 0] / self.temperature                  # (B, S+1)
        a = torch.softmax(scores, dim=-1)
        self._last = a.detach()
        return target * (1 + a[:, -1, None, None]) + torch.einsum("bs,sld->bld", a[:, :-1], self.sources)

    def _task_ids(self, ctx: CallContext, batch: int) -> torch.Tensor:
        ids = ctx.task_ids_for(batch)
        if ids is None:
            raise RoutingError(f"this AttentionMix has one target prompt per task {list(self.config.tasks)}; "
                               "pass task_ids= (names or indices) with every call")
        return ids

    def last_attention(self) -> torch.Tensor:
        """Weights a (B, S+1) of the latest call, detached; columns as in `candidates`.

        `last_entropy()` gives their entropy per example relative to uniform.
        """
        if self._last is None:
            raise RoutingError("no attention weights yet: run the model once first")
        return self._last

    def last_entropy(self) -> torch.Tensor:
        """Entropy of each example's weights in the latest call over its maximum ln(S+1): (B,).

        1 is uniform attention (the mixture ignores the input), 0 one candidate alone. With
        no sources there is one candidate and the entropy is 0.
        """
        a = self.last_attention()
        if a.shape[1] < 2:
            return a.new_zeros(a.shape[0])
        return -(a * a.clamp_min(1e-12).log()).sum(1) / math.log(a.shape[1])

    def parents(self) -> list[dict[str, Any]]:
        """{"ref", "sha256"} of the sources that were registry modules when the module was built.

        Sources given as values are labels, not refs. sha256 is the registry card's digest;
        `compose` records the list in `model.parents`, which `save_pretrained` and
        `Registry.add` write.
        """
        return list(self.resolved)


def pool_tokens(x: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """Max or mean of (B, n, d) over n, positions with mask 0 left out: (B, d)."""
    if mask is None:
        return x.amax(1) if how == "max" else x.mean(1)
    keep = mask[..., None].to(torch.bool)
    if how == "max":
        return x.masked_fill(~keep, torch.finfo(x.dtype).min).amax(1)
    return (x * keep).sum(1) / keep.sum(1).clamp(min=1)


def _source_values(name: str, values: Mapping[str, torch.Tensor], registry: Any, base: nn.Module, d: int,
                   what: str = "AttentionMix source") -> torch.Tensor:
    """The (L_j, d) values of one source, resolving names without values through the registry;
    errors call it `what` `name`."""
    value = values.get(name)
    if value is None:
        if registry is None:
            raise ConfigError(f"{what} {name!r} is a name without values: pass the prompt itself "
                              "(tensor, PromptModule or ModularModel) or registry= to resolve it")
        value = _prompt_tensor(name, registry.load(name, base, heads=False), what)
    if value.shape[1] != d:
        raise ConfigError(f"{what} {name!r} has width {value.shape[1]}, but this model's "
                          f"embeddings have width {d}: use prompts trained on this base model")
    return value


def _split_sources(sources: Any, owner: str = "AttentionMix", field: str = "sources",
                   label: str = "source") -> tuple[tuple[str, ...], dict[str, torch.Tensor]]:
    """Names of `sources` (a list or a {name: value} mapping) and the (L, d) values given for them.

    Errors name `owner`.`field`; unnamed values are called `label`0, `label`1, ...
    """
    if isinstance(sources, (str, torch.Tensor, nn.Module)):
        raise ConfigError(f"{owner}.{field} must be a list (or {{name: prompt}} mapping) of {label}s, "
                          f"got one {type(sources).__name__}")
    items = list(sources.items()) if isinstance(sources, Mapping) else \
        [(s if isinstance(s, str) else f"{label}{i}", s) for i, s in enumerate(sources)]
    return tuple(name for name, _ in items), {name: _prompt_tensor(name, value, f"{owner} {label}")
                                              for name, value in items
                                              if value is not name}  # a listed ref is its own name


def _prompt_tensor(name: str, value: Any, what: str = "AttentionMix source") -> torch.Tensor:
    """The (L, d) embeddings of a tensor, PromptModule or ModularModel holding one prompt module;
    errors call it `what` `name`."""
    if isinstance(value, ModularModel):
        found = [m for m in value.modules_of("prompt") if isinstance(m, PromptModule)]
        if len(found) != 1:
            raise ConfigError(f"{what} {name!r} is a model with {len(found)} prompt modules; "
                              "it must hold exactly one")
        value = found[0]
    if isinstance(value, PromptModule):
        value = value.embeddings
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        raise ConfigError(f"{what} {name!r} must be a (length, hidden) tensor, a PromptModule, a "
                          f"ModularModel with one prompt (refs go in a list), got {type(value).__name__}"
                          f"{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}")
    return value.detach().float().cpu().clone()
