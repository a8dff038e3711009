"""Rank source prompts for a new task: `rank_sources`, returning a `Ranking`.

The target task is represented the SPoT way: by a prompt briefly tuned on it
(with a trained copy of the task head), unless a tuned `target` model is
given. Each candidate is scored against it with one metric (`metrics`), or by
`zero_shot` (the default for classification targets): the target model's likelihood on the
target data when the source prompt replaces its prompt as is,

    zero_shot = exp(−mean CE) ∈ (0, 1]   (the geometric-mean probability of the right label),

or by `leep` / `adjusted_leep`: each source module as it is (its prompt and its own trained
head) on the target data, scored by LEEP or by LEEP minus its value with the target labels
permuted (`metrics`); no target prompt is tuned, and candidates without a trained head are
excluded with the reason.

Two naive baselines rank too, since a metric is only worth its cost where it beats them
(`benchmarks/real_evidence.py` measures all of them side by side):

    source_accuracy  = the source's own held-out accuracy recorded on its registry card
                       (`metrics={"accuracy": …}` at `Registry.add`); it ignores the target
    embedding_cosine = cos(ē_target, ē_source), ē = mean over a dataset of its inputs'
                       normalised mean-pooled last hidden states (`transfer.embedding`);
                       it reads inputs only, from `source_data={name: examples}`

Activation metrics run every candidate (and the target) through the frozen
base in stacked forwards, `chunk` prompts at a time.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, IncompatibleModuleError
from ..model import attach
from ..model.io import base_model_info, check_compatible
from ..model.modular import ModularModel
from ..modules.prompt import Prompt, PromptModule
from ..registry import Ranking, require_registry
from ..tasks import Example, as_examples
from ..tasks.generative import is_generative
from ..training import fit, mean_loss, probabilities
from .activations import prompt_activations
from .embedding import dataset_embedding
from .generative import GENERATIVE_DEFAULT, GENERATIVE_METRICS, rank_generative
from .generative import is_card as _is_card, named as _named
from .methods import prompt_module, prompt_tensor
from .metrics import ACTIVATION_METRICS, Layers, adjusted_leep, leep, score_matrix

METRICS = ("on", "activation_cosine", "cosine_avg", "cosine_tokens", "euclidean", "zero_shot", "leep",
           "adjusted_leep")
HEAD_METRICS = {"leep": leep, "adjusted_leep": adjusted_leep}  # read each source's own head; tune no target
BASELINE_METRICS = ("source_accuracy", "embedding_cosine")  # naive: the target's labels are never read
TARGET_NAME = "rank-target"


def _load_entry(base: nn.Module, value: Any, registry: Any, heads: bool | str) -> ModularModel:
    """A registry ref or card that holds a soft prompt, attached to `base` (the caller detaches it)."""
    registry = require_registry(registry, f"candidate {getattr(value, 'ref', value)!r}")
    card = value if _is_card(value) else registry.get(value)
    check_compatible(card.base_model, base, f"module {card.ref}")
    if "prompt" not in card.kinds:
        raise ConfigError(f"holds no soft prompt (kinds: {', '.join(card.kinds)})")
    return registry.load(card.ref, base, heads=heads)


def _from_registry(base: nn.Module, value: Any, registry: Any) -> PromptModule:
    """Load a registry ref or card onto `base`, keep its prompt, and detach again."""
    model = _load_entry(base, value, registry, heads=False)
    try:
        found = prompt_module(model)
    finally:
        model.detach()
    return found


def resolve(base: nn.Module, candidates: Any, registry: Any = None,
            progress: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[tuple[str, str]]]:
    """Prompts (L, d) and modules of the usable candidates, and (name, reason) of the others."""
    d = base.get_input_embeddings().weight.shape[1]
    prompts: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    excluded: list[tuple[str, str]] = []
    for name, value in tqdm(_named(candidates), desc="candidates", disable=not progress, leave=False):
        try:
            if isinstance(value, str) or _is_card(value):
                value = _from_registry(base, value, registry)
            elif isinstance(value, ModularModel):
                check_compatible(base_model_info(value.base), base, f"candidate {name!r}")
            prompt = prompt_tensor(value)
            if prompt.shape[1] != d:
                raise IncompatibleModuleError(f"prompt width {prompt.shape[1]} differs from this base's hidden "
                                              f"size {d}")
        except (IncompatibleModuleError, ConfigError) as e:
            excluded.append((name, str(e)))
            continue
        prompts[name] = prompt.float().cpu()
        modules[name] = PromptModule(Prompt(length=prompt.shape[0]), prompt.clone()) \
            if isinstance(value, torch.Tensor) else value
    return prompts, modules, excluded


@torch.no_grad()
def zero_shot(model: ModularModel, source: Any, data: Sequence[Example], tokenizer: Any, batch_size: int = 64,
              max_length: int = 64) -> float:
    """exp(−mean CE) of `model` on `data` with its prompt replaced by `source` as is (its head kept)."""
    module = prompt_module(model)
    saved = module.embeddings
    module.embeddings = nn.Parameter(prompt_tensor(source).to(saved), requires_grad=False)
    try:
        return math.exp(-mean_loss(model, data, tokenizer, batch_size, max_length))
    finally:
        module.embeddings = saved


def _tokenizer(base: nn.Module, tokenizer: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer
    path = getattr(base.config, "name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"no tokenizer found for {path!r} ({e}); pass tokenizer=") from None


def _filler(tokenizer: Any) -> int | None:
    for attr in ("mask_token_id", "cls_token_id", "bos_token_id", "pad_token_id"):
        if getattr(tokenizer, attr, None) is not None:
            return getattr(tokenizer, attr)
    return None


def rank_sources(base: nn.Module, target_data: Any, candidates: Any, metric: str | None = None, *,
                 tokenizer: Any = None, target: ModularModel | Prompt | None = None, target_steps: int = 50,
                 batch_size: int = 16, lr: float = 0.03, layers: Layers = None, position: str = "filler",
                 registry: Any = None, eval_examples: int = 128, chunk: int = 64, seed: int = 0,
                 target_seeds: int = 1, max_length: int = 64, progress: bool = False, split: str | None = None,
                 columns: Mapping[str, str | None] | None = None, shortlist: int | None = None,
                 source_data: Mapping[str, Any] | None = None) -> Ranking:
    """Score every candidate source prompt for the target task and sort them, best first.

    Generative targets (`GenerativeExample`s, or rows with input and target columns) are ranked by
    `pelthub.transfer.generative` instead: candidates are any module sets, scored by "likelihood" (the
    default there), "choice_leep" or "arrow_routing" on the first `eval_examples` examples, with no
    target tuning; `shortlist=K` scores only the K LoRAs whose routing signatures retrieve best (see
    that module). Only tokenizer, registry, batch_size, max_length, chunk, progress and columns apply.

    metric: "zero_shot" by default for classification targets: the one metric that ranked better
    than random in both studies. On real text (`python -m benchmarks.real_evidence`: 11 real-text
    sources with 3 shuffled-label controls, 3 real held-out targets × 4 seeds, real MiniLM),
    Spearman ρ with the measured SPoT gains was zero_shot +0.44 ± 0.20 (top-1 regret 0.017),
    adjusted_leep −0.01 ± 0.14 (0.057), random order 0 (0.050), and the naive baselines
    source_accuracy −0.12 and embedding_cosine −0.57. On the synthetic suite
    (`python -m benchmarks.transfer_evidence`, 3 targets × 5 seeds) leep and adjusted_leep were
    perfect (a same-family source first in 15 of 15 cells, ρ +0.74 / +0.65) and zero_shot
    second (11 of 15, ρ +0.40): where sources carry the target's label semantics, the leeps
    read them best; on real text their heads said nothing about which warm start helps.
    zero_shot tunes a target prompt first (`target_steps`, the cost of one short run) and then
    takes one forward pass per candidate; it ranks bare prompt tensors too. leep /
    adjusted_leep read each source's own trained head instead and tune nothing (registry
    entries and ModularModels trained with head=True; others land in `Ranking.excluded`):
    the cheaper choice where sources and target share label semantics. The naive baselines
    (module docstring): "source_accuracy" reads each registry card's recorded accuracy;
    "embedding_cosine" needs `source_data={candidate name: its training examples}`.
    Candidates lacking what they read land in `Ranking.excluded`.

    base: the plain sequence-classification model (its head's label count fits
    `target_data`). target_data: a list of `Example`, a 🤗 `datasets.Dataset`, or a
    `DatasetDict` with `split=` (columns found by name or given as `columns=`, see
    `pelthub.tasks.as_examples`; label ids must be below `MAX_LABELS`). candidates: a list or {name: candidate} mapping of (L, d)
    tensors, PromptModules, ModularModels holding one prompt, registry refs
    or cards (refs and cards are loaded through `registry=`, which they
    need). Candidates trained on another architecture, of
    another width, or holding no single prompt land in `Ranking.excluded`
    with the reason. target: a ModularModel already tuned on the target (one
    prompt plus head), or the Prompt config to tune for `target_steps` AdamW
    steps (default: the most common candidate length, init "random").
    layers: the ON / activation_cosine layer window; position: see
    `activations`; the filler token is the tokenizer's mask token (else its
    CLS, BOS or pad token; the config's pad token when no tokenizer is
    needed or given). zero_shot and leep use the first `eval_examples`
    target examples. `tokenizer` defaults to `AutoTokenizer` for the base's
    `name_or_path` when tuning, zero_shot or leep needs one. target_seeds: tune the
    target prompt with seeds seed, seed+1, … and average each candidate's
    score over them: one short tuning run is a noisy task embedding (on
    MiniLM the top-ranked source changed between seeds of one target).
    """
    if isinstance(base, ModularModel):
        raise ConfigError("rank_sources takes the plain base model; pass model.base (with no modules attached)")
    if is_generative(target_data):
        return rank_generative(base, target_data, candidates, metric or GENERATIVE_DEFAULT,
                               _tokenizer(base, tokenizer), registry, eval_examples, batch_size, max_length, chunk,
                               shortlist, columns, progress)
    metric = metric or "zero_shot"
    if metric not in METRICS + BASELINE_METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of {list(METRICS + BASELINE_METRICS)}"
                          + (" (generative metrics need GenerativeExample targets)" if metric in GENERATIVE_METRICS
                             else ""))
    if shortlist is not None:
        raise ConfigError("shortlist= retrieves LoRAs for generative targets; classification targets rank "
                          "prompts: leave shortlist out")
    target_data = as_examples(target_data, split, columns)
    if not target_data:
        raise ConfigError("target_data is empty: give labelled examples of the target task")
    if not isinstance(target_steps, int) or target_steps < 1:
        raise ConfigError(f"target_steps must be a positive int, got {target_steps!r}")
    owned = not isinstance(target, ModularModel)
    if not isinstance(target_seeds, int) or target_seeds < 1 or (target_seeds > 1 and not owned):
        raise ConfigError(f"target_seeds must be a positive int (1 when a tuned target model is given), "
                          f"got {target_seeds!r}")
    if not owned and target.base is not base:
        check_compatible(base_model_info(target.base), base, "the target model")
    if source_data is not None and metric != "embedding_cosine":
        raise ConfigError(f"source_data= is read by metric='embedding_cosine' only, not by {metric!r}")
    if metric in BASELINE_METRICS:
        if target is not None:
            raise ConfigError(f"{metric} is a naive baseline that tunes no target; pass no target=")
        return _rank_by_baseline(metric, base, target_data, candidates, _tokenizer(base, tokenizer)
                                 if metric == "embedding_cosine" else None, registry, source_data, max_length,
                                 progress)
    if metric in HEAD_METRICS:
        if target is not None:
            raise ConfigError(f"{metric} reads each source's own head on the target data and tunes no target; "
                              "pass no target=")
        return _rank_by_head(metric, base, list(target_data)[:eval_examples], candidates,
                             _tokenizer(base, tokenizer), registry, max_length, progress)
    if owned or metric == "zero_shot":
        tokenizer = _tokenizer(base, tokenizer)
    prompts, modules, excluded = resolve(base, candidates, registry, progress)
    if not prompts:
        return Ranking(metric, [], excluded, {})
    mine = None
    if metric == "euclidean":
        length = target.length if isinstance(target, Prompt) else prompt_tensor(target).shape[0] if not owned \
            else Counter(p.shape[0] for p in prompts.values()).most_common(1)[0][0]
        bad = [n for n, p in prompts.items() if p.shape[0] != length]
        excluded += [(n, f"euclidean needs length {length}, this prompt has {prompts.pop(n).shape[0]} tokens")
                     for n in bad]
    names = list(prompts)
    if not names:
        return Ranking(metric, [], excluded, {})
    runs = []
    for r in range(target_seeds):
        model = _tune_target(base, target_data, tokenizer, target, prompts, target_steps, batch_size, lr, seed + r,
                             max_length, progress) if owned else target
        try:
            here = prompt_tensor(model).float().cpu()
            mine = here if mine is None else mine
            runs.append(_scores(metric, base, model, here, [prompts[n] for n in names], target_data, tokenizer,
                                layers, position, eval_examples, chunk, max_length, progress))
        finally:
            if owned:
                model.detach()
    scores = torch.tensor(runs, dtype=torch.float64).mean(0).tolist()
    rows = sorted(zip(names, map(float, scores)), key=lambda r: (-r[1], r[0]))
    return Ranking(metric, rows, excluded, {n: modules[n] for n, _ in rows}, mine)


def _rank_by_head(metric: str, base: nn.Module, data: list[Example], candidates: Any, tokenizer: Any,
                  registry: Any, max_length: int, progress: bool) -> Ranking:
    """A HEAD_METRICS score of every candidate that carries a trained head: a registry entry (loaded on
    `base` with its head at its own label count, one at a time) or a ModularModel (run as it is)."""
    labels = torch.tensor([e.label for e in data])
    scores: dict[str, float] = {}
    modules: dict[str, Any] = {}
    excluded: list[tuple[str, str]] = []
    for name, value in tqdm(_named(candidates), desc=metric, disable=not progress, leave=False):
        try:
            if isinstance(value, str) or _is_card(value):
                model = _load_entry(base, value, registry, heads="as_saved")
            elif isinstance(value, ModularModel):
                check_compatible(base_model_info(value.base), base, f"candidate {name!r}")
                model = value
            else:
                raise ConfigError(f"{metric} reads the source's own trained head: pass a registry ref or a "
                                  "ModularModel trained with head=True (metric='zero_shot' ranks bare prompts)")
            try:
                if not model.heads:
                    raise ConfigError("holds no trained head (train the source with head=True)")
                prompt = prompt_tensor(model)                        # exactly one prompt: a source for init_from
                scores[name] = HEAD_METRICS[metric](probabilities(model, data, tokenizer, max_length=max_length),
                                                    labels)
                modules[name] = value if model is value else PromptModule(Prompt(length=len(prompt)), prompt.clone())
            finally:
                if model is not value:
                    model.detach()
        except (IncompatibleModuleError, ConfigError) as e:
            excluded.append((name, str(e)))
    rows = sorted(scores.items(), key=lambda r: (-r[1], r[0]))
    return Ranking(metric, rows, excluded, {n: modules[n] for n, _ in rows})


def _rank_by_baseline(metric: str, base: nn.Module, data: Sequence[Example], candidates: Any, tokenizer: Any,
                      registry: Any, source_data: Mapping[str, Any] | None, max_length: int, progress: bool
                      ) -> Ranking:
    """Prompt candidates scored by a naive baseline: the accuracy on their registry cards, or the cosine of
    their training inputs' dataset embedding with the target's."""
    if metric == "embedding_cosine" and not isinstance(source_data, Mapping):
        raise ConfigError("metric='embedding_cosine' compares datasets: pass source_data={candidate name: its "
                          f"training examples}}, got {type(source_data).__name__}")
    prompts, modules, excluded = resolve(base, candidates, registry, progress)
    given = dict(_named(candidates))
    scores: dict[str, float] = {}
    mine = dataset_embedding(base, data, tokenizer, max_length=max_length) if metric == "embedding_cosine" else None
    for name in prompts:
        if metric == "source_accuracy":
            value = given[name]
            card = value if _is_card(value) else registry.get(value) if isinstance(value, str) else None
            recorded = card.metrics.get("accuracy") if card is not None else None
            if not isinstance(recorded, (int, float)) or not math.isfinite(recorded):
                excluded.append((name, "no accuracy recorded: register the source with metrics={'accuracy': ...}"))
                continue
            scores[name] = float(recorded)
        elif name not in source_data:
            excluded.append((name, "no entry in source_data: its training examples are needed"))
        else:
            theirs = dataset_embedding(base, source_data[name], tokenizer, max_length=max_length)
            scores[name] = float(nn.functional.cosine_similarity(mine, theirs, dim=0))
    rows = sorted(scores.items(), key=lambda r: (-r[1], r[0]))
    return Ranking(metric, rows, excluded, {n: modules[n] for n, _ in rows})


def _scores(metric: str, base: nn.Module, model: ModularModel, mine: torch.Tensor, candidates: list[torch.Tensor],
            target_data: Sequence[Example], tokenizer: Any, layers: Layers, position: str, eval_examples: int,
            chunk: int, max_length: int, progress: bool) -> list[float]:
    """Each candidate's score against one tuned target model (its prompt `mine`)."""
    if metric == "zero_shot":
        data = list(target_data)[:eval_examples]
        return [zero_shot(model, p, data, tokenizer, max_length=max_length)
                for p in tqdm(candidates, desc="zero-shot", disable=not progress, leave=False)]
    if metric in ACTIVATION_METRICS:
        acts = prompt_activations(base, [mine, *candidates], _filler(tokenizer), position, chunk, progress)
        return score_matrix(metric, acts[:1], acts[1:], layers)[0].tolist()
    return score_matrix(metric, [mine], candidates)[0].tolist()


def _tune_target(base: nn.Module, data: Sequence[Example], tokenizer: Any, target: Prompt | None,
                 prompts: Mapping[str, torch.Tensor], steps: int, batch_size: int, lr: float, seed: int,
                 max_length: int, progress: bool) -> ModularModel:
    """A prompt (plus head) briefly tuned on the target task: its task embedding."""
    labels = max(e.label for e in data) + 1
    if labels > getattr(base.config, "num_labels", labels):
        raise ConfigError(f"the target data has {labels} labels but the base's head has {base.config.num_labels}; "
                          f"load it with num_labels={labels}")
    if target is None:
        target = Prompt(length=Counter(p.shape[0] for p in prompts.values()).most_common(1)[0][0])
    if not isinstance(target, Prompt):
        raise ConfigError(f"target must be a Prompt config or a tuned ModularModel, got {type(target).__name__}")
    torch.manual_seed(seed)
    model = attach(base, target, name=TARGET_NAME, head=True)
    try:
        fit(model, data, tokenizer, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
            max_length=max_length, progress="target prompt" if progress else False)
    except BaseException:
        model.detach()
        raise
    return model

