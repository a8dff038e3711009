"""Rank any module sets (prompts, LoRAs, IA3, ..., registry refs) for a generative target.

The target is `GenerativeExample`s (an input the model reads, a target it should write, answer
`choices` for multiple-choice tasks). Each candidate is one module set, scored as it is, with no
target tuning, by one metric:

    likelihood      (1/T) Σ_i Σ_{t ∈ target_i} log p_s(y_it | x_i, y_i<t)     (T target tokens in all, EOS included)

the mean target log-likelihood per token with source s in place, i.e. −(its zero-shot loss);

    choice_leep     θ_s(x_i)_z = softmax_z( (1/|c_iz|) log p_s(c_iz | x_i) )  over the choices z of example i
                    P̂(y, z) = (1/n) Σ_i θ_s(x_i)_z [y_i = y],   P̂(y | z) = P̂(y, z) / Σ_y' P̂(y', z)
                    choice_leep = (1/n) Σ_i log Σ_z P̂(y_i | z) θ_s(x_i)_z        ≤ 0

LEEP (Nguyen et al. 2020) with the source's "labels" the choice positions z (its distribution
over them the softmax of length-normalised choice log-likelihoods, as rank classification reads
them) and the target label y_i the position of the right choice; it needs every example to have
choices;

    arrow_routing   mass_s = Σ_{(t, l)} w_s(h_tl) / #{(t, l)},   w_s(h) = softmax_{e ∈ K(h)}(|h·p_e| / τ), 0 outside K(h)

Arrow's routing weight (`pelthub.routing.arrow`: p_e the top right singular vector of a LoRA's
ΔW at layer l, K(h) the `ARROW_TOP_K` largest |h·p_e| among the candidates adapting l, τ = 1)
averaged over the target inputs' real tokens t at every layer l some candidate adapts; it reads
LoRAs only (a set's LoRA when it holds other kinds too) and, summed over the candidates, is 1.

`likelihood` and `choice_leep` run plain sets (LoRA, IA3, adapters, LN: `SELECTABLE`) `chunk` at a
time in one pass over the data (`adapters=`, each batch repeated per set); prompts, prefixes and
routed sets run one at a time. A candidate ModularModel attached to the ranked base itself steps
aside (`disable_adapter`) while the base is read.

The default is `likelihood`, by measurement on synthetic tasks and a tiny model only
(`python -m benchmarks.generative_rank`: a 2-layer width-64 GPT-2 trained on copying, 8 source
LoRAs each trained on one operation on letter sequences, 6 held-out operations as multiple-choice
targets, a source's gain = target test loss after 30 steps from the fresh LoRA init minus after 30
steps from the source's weights): mean Spearman ρ between scores and gains +0.71 ± 0.19 for
likelihood, +0.35 ± 0.49 for choice_leep, −0.57 ± 0.29 for arrow_routing (which ranks sources
backwards there); each metric's top-1 was the largest-gain source in 1, 1 and 0 of 6 targets.
No such evidence exists yet on real generative tasks.

`rank_sources(..., shortlist=K)` retrieves the LoRAs most like the target before any of that is paid:

    key_s = (1/|L_s|) Σ_{l ∈ L_s} (1/n_l) Σ_t |cos(h_tl, p_sl)|             (L_s: the layers LoRA s adapts)

over the tokens t of each target input followed by its target ("input target", the text likelihood
reads), one matmul per layer over the stacked prototypes (stored by the registry for its LoRAs, so
nothing is loaded); then the K best keys are scored with the metric. In `benchmarks/rank_scale.py`
(K = 64 of 1,000 synthetic LoRAs, likelihood) the key on inputs alone missed the best source family
on deb_bio_tech (regret 0.46 nats/token); with the targets appended the regrets on deb_bio_tech,
deb_num_text and deb_topics were 0.0014, 0.0002 and 0.045 (the last above the 0.01 aimed at).
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError, IncompatibleModuleError
from ..generative import choice_scores, evaluate
from ..model.io import base_model_info, check_compatible
from ..model.modular import ModularModel
from ..modules.bank import SELECTABLE
from ..modules.base import PeltModule, site_name
from ..modules.lora import LoRAModule, top_right_singular
from ..modules.prompt import Prompt, PromptModule
from ..registry import Ranking, require_registry
from ..registry.signatures import WEIGHTS_FILE, Signature, stored, stored_by_weights, table
from ..tasks.generative import GenerativeExample, encode, generative_examples
from .metrics import leep

GENERATIVE_METRICS = ("likelihood", "choice_leep", "arrow_routing")
GENERATIVE_DEFAULT = "likelihood"
ARROW_TOP_K = 3
ModuleSet = dict[str, PeltModule]


def is_card(value: Any) -> bool:
    """Whether `value` is a registry card (duck-typed: the hub's cards are cards too)."""
    return hasattr(value, "ref") and hasattr(value, "base_model") and hasattr(value, "kinds")


def named(candidates: Any) -> list[tuple[str, Any]]:
    """(name, candidate) pairs of a list (refs and cards name themselves) or a {name: candidate} mapping."""
    if isinstance(candidates, (torch.Tensor, nn.Module, str)) or is_card(candidates):
        raise ConfigError("candidates must be a list or a {name: candidate} mapping, got one "
                          f"{type(candidates).__name__}")
    items = list(candidates.items()) if isinstance(candidates, Mapping) else [
        (c if isinstance(c, str) else c.ref if is_card(c) else f"candidate{i}", c) for i, c in enumerate(candidates)]
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ConfigError(f"candidate names must be distinct, got {sorted(n for n in names if names.count(n) > 1)}")
    return items


def module_set(base: nn.Module, value: Any, registry: Any = None) -> ModuleSet:
    """The one module set {kind: module} a candidate holds: a registry ref or card, a ModularModel
    with one set, a module, or a prompt tensor (L, d)."""
    if isinstance(value, str) or is_card(value):
        registry = require_registry(registry, f"candidate {getattr(value, 'ref', value)!r}")
        model = registry.load(value.ref if is_card(value) else value, base, heads=False)
        sets = dict(model.adapters)
        model.detach()
    elif isinstance(value, ModularModel):
        check_compatible(base_model_info(value.base), base, "candidate")
        sets = dict(value.adapters)
    elif isinstance(value, PeltModule):
        sets = {"": {value.config.kind: value}}
    elif isinstance(value, torch.Tensor) and value.dim() == 2:
        d = base.get_input_embeddings().weight.shape[1]
        if value.shape[1] != d:
            raise IncompatibleModuleError(f"prompt width {value.shape[1]} differs from this base's hidden size {d}")
        sets = {"": {"prompt": PromptModule(Prompt(length=value.shape[0]), value.detach().clone())}}
    else:
        raise ConfigError(f"a candidate is a registry ref or card, a ModularModel, a module or a prompt tensor "
                          f"(length, hidden), got {type(value).__name__}")
    if len(sets) != 1:
        raise ConfigError(f"holds {len(sets)} module sets ({', '.join(sets)}); pass each set as its own candidate")
    return dict(next(iter(sets.values())))


def _attach(model: ModularModel, name: str, found: ModuleSet) -> None:
    model.add(name, [m.config for m in found.values()], init=False)
    model.adapters[name].load_state_dict(nn.ModuleDict(found).state_dict())


def per_set(base: nn.Module, sets: Mapping[str, ModuleSet], score: Callable[[ModularModel, list[str] | None], Any],
            chunk: int, progress: bool = False) -> dict[str, Any]:
    """{name: score(...)} of every set: plain sets `chunk` at a time on one model (score gets the names they
    are attached under, "set0", ..., and returns {such name: value}), the others each alone (score gets
    None and returns the value). Candidate names never become attribute names ("double", "a.b")."""
    names = list(sets)
    selectable = [set(sets[n]) <= set(SELECTABLE) for n in names]
    plain = [i for i, ok in enumerate(selectable) if ok]
    groups = [plain[i:i + chunk] for i in range(0, len(plain), chunk)] + [[i] for i, ok in enumerate(selectable)
                                                                          if not ok]
    out: dict[str, Any] = {}
    for group in tqdm(groups, desc="candidates", disable=not progress, leave=False):
        model = ModularModel(base)
        try:
            for i in group:
                _attach(model, f"set{i}", sets[names[i]])
            if selectable[group[0]]:
                found = score(model.eval(), [f"set{i}" for i in group])
                out.update({names[i]: found[f"set{i}"] for i in group})
            else:
                out[names[group[0]]] = score(model.eval(), None)
        finally:
            model.detach()
    return out


def _choice_leep(table: torch.Tensor, answers: torch.Tensor) -> float:
    """choice_leep (module docstring) of one set's (n, C) choice scores (-inf past an example's choices)."""
    return leep(torch.softmax(table.double(), dim=-1), answers)


def prototypes(found: ModuleSet) -> Signature:
    """{site: p} of a set's LoRA: the top right singular vector of each layer's ΔW."""
    lora = next((m for m in found.values() if isinstance(m, LoRAModule)), None)
    if lora is None:
        raise ConfigError(f"arrow_routing and shortlist read LoRAs; this set holds {', '.join(found)}")
    return {site_name(key): top_right_singular(layer.lora_a.detach().float().cpu(), layer.lora_b.detach().float().cpu())
            for key, layer in lora.layers.items()}


def routing_mass(hidden: Mapping[str, torch.Tensor], signatures: Sequence[Signature], top_k: int = ARROW_TOP_K,
                 temperature: float = 1.0) -> torch.Tensor:
    """mass_s (n,) of the module docstring for hidden states {site: (tokens, in)}."""
    mass, pairs = torch.zeros(len(signatures), dtype=torch.float64), 0
    for site, (ids, p) in table(signatures).items():
        h = hidden.get(site)
        if h is None or not h.shape[0]:
            continue
        top, chosen = (h.to(p.dtype) @ p.T).abs().topk(min(top_k, len(ids)), dim=1)
        weights = torch.softmax(top.double() / temperature, dim=1)
        mass.index_add_(0, ids[chosen.reshape(-1)], weights.reshape(-1))
        pairs += h.shape[0]
    return mass / max(pairs, 1)


def retrieval_keys(hidden: Mapping[str, torch.Tensor], signatures: Sequence[Signature]) -> torch.Tensor:
    """key_s (n,) of the module docstring: mean |cosine| of each LoRA's prototypes with the target tokens."""
    total, layers = torch.zeros(len(signatures), dtype=torch.float64), torch.zeros(len(signatures))
    for site, (ids, p) in table(signatures).items():
        h = hidden.get(site)
        if h is None or not h.shape[0]:
            continue
        total.index_add_(0, ids, (F.normalize(h.double(), dim=-1) @ F.normalize(p.double(), dim=-1).T).abs().mean(0))
        layers.index_add_(0, ids, torch.ones(len(ids)))
    return total / layers.clamp(min=1)


def _signature(base: nn.Module, value: Any, registry: Any, cards: Mapping[str, Any],
               stored_by_sha: Mapping[str, Signature]) -> Signature:
    """A candidate's prototypes, from the registry's stored signatures when it is a ref (nothing loaded);
    `cards` are the registry's LoRA cards for this base by ref, read in one query."""
    if isinstance(value, str) or is_card(value):
        card = cards.get(value.ref if is_card(value) else value)  # found by searching for this base: it fits
        if card is None:
            card = value if is_card(value) else require_registry(registry, f"candidate {value!r}").get(value)
            check_compatible(card.base_model, base, f"module {card.ref}")
        found = stored_by_sha.get(card.files[WEIGHTS_FILE]["sha256"]) if card.kinds == ["lora"] else None
        if found is None and card.kinds == ["lora"]:
            found = stored(registry, card.ref)
        if not found:
            raise ConfigError(f"holds {', '.join(card.kinds)}, not one LoRA: shortlist retrieves LoRAs by their "
                              "routing signatures; rank without shortlist=")
        return found
    return prototypes(module_set(base, value, registry))


@torch.no_grad()
def hidden_states(base: nn.Module, tokenizer: Any, data: Sequence[GenerativeExample], sites: Sequence[str],
                  batch_size: int, max_length: int) -> dict[str, torch.Tensor]:
    """{site: (tokens, in)} inputs of `sites` at the target inputs' real tokens (their first `max_length`);
    a seq2seq decoder reads the input too, as `registry.signatures.hidden_states` has it."""
    encoder_decoder = bool(getattr(base.config, "is_encoder_decoder", False))
    names = dict(base.named_modules())
    found: dict[str, list[torch.Tensor]] = {s: [] for s in sites if s in names}
    keep = torch.ones(0, dtype=torch.bool)

    def hook(site: str) -> Callable[..., None]:
        return lambda _m, args, _out: found[site].append(args[0].reshape(-1, args[0].shape[-1])[keep].float().cpu())
    handles = [names[s].register_forward_hook(hook(s)) for s in found]
    device = next(base.parameters()).device
    try:
        for start in range(0, len(data), batch_size):
            # right-padded (as a seq2seq input is), so each real token sits at its own position
            batch = {k: v.to(device) for k, v in encode(tokenizer, data[start:start + batch_size], True, max_length,
                                                        targets=False).items()}
            if encoder_decoder:
                batch.update(decoder_input_ids=batch["input_ids"], decoder_attention_mask=batch["attention_mask"])
            keep = batch["attention_mask"].bool().reshape(-1).cpu()
            base(**batch)
    finally:
        for h in handles:
            h.remove()
    return {s: torch.cat(v) for s, v in found.items()}


def rank_generative(base: nn.Module, target_data: Any, candidates: Any, metric: str, tokenizer: Any,
                    registry: Any = None, eval_examples: int = 128, batch_size: int = 16, max_length: int = 128,
                    chunk: int = 32, shortlist: int | None = None, columns: Mapping[str, str] | None = None,
                    progress: bool = False) -> Ranking:
    """Candidates scored by `metric` (module docstring) on the first `eval_examples` target examples, best
    first; with `shortlist=K`, only the K LoRAs of highest retrieval key are scored (`Ranking.rows` holds
    those; candidates that are not single LoRAs land in `Ranking.excluded`)."""
    if metric not in GENERATIVE_METRICS:
        raise ConfigError(f"metric {metric!r} ranks classification targets; for generative targets choose one of "
                          f"{list(GENERATIVE_METRICS)}")
    if base.get_output_embeddings() is None:
        raise ConfigError(f"generative targets need a causal LM or seq2seq base, got {type(base).__name__}")
    data = generative_examples(target_data, columns)[:eval_examples]
    if not data:
        raise ConfigError("target_data is empty: give generative examples of the target task")
    if metric == "choice_leep":
        bare = [i for i, e in enumerate(data) if not e.choices]
        if bare:
            raise DataError(f"choice_leep needs answer choices on every target example; examples {bare[:5]} have "
                            "none (use metric='likelihood' for free-text targets)")
    items, excluded = named(candidates), []
    given = dict(items)
    with ExitStack() as stack:  # candidates attached to `base` itself step aside while it is read
        for value in given.values():
            if isinstance(value, ModularModel) and value.base is base:
                stack.enter_context(value.disable_adapter())
        if shortlist is not None:
            items, excluded = _shortlist(base, data, items, tokenizer, registry, shortlist, batch_size, max_length)
        sets: dict[str, ModuleSet] = {}
        for name, value in tqdm(items, desc="loading", disable=not progress, leave=False):
            try:
                sets[name] = module_set(base, value, registry)
            except (IncompatibleModuleError, ConfigError) as e:
                excluded.append((name, str(e)))
        scores = _scores(metric, base, data, sets, tokenizer, batch_size, max_length, chunk, excluded, progress)
    rows = sorted(scores.items(), key=lambda r: (-r[1], r[0]))
    return Ranking(metric, rows, excluded, {n: given[n] for n, _ in rows})


def _scores(metric: str, base: nn.Module, data: list[GenerativeExample], sets: dict[str, ModuleSet], tokenizer: Any,
            batch_size: int, max_length: int, chunk: int, excluded: list[tuple[str, str]],
            progress: bool) -> dict[str, float]:
    if metric == "arrow_routing":
        loras: dict[str, Signature] = {}
        for name, found in sets.items():
            try:
                loras[name] = prototypes(found)
            except ConfigError as e:
                excluded.append((name, str(e)))
        if not loras:
            return {}
        hidden = hidden_states(base, tokenizer, data, sorted({s for p in loras.values() for s in p}), batch_size,
                               max_length)
        return dict(zip(loras, routing_mass(hidden, list(loras.values())).tolist()))
    if not sets:
        return {}
    if metric == "likelihood":
        def score(model: ModularModel, names: list[str] | None) -> Any:
            found = evaluate(model, data, tokenizer, ("loss",), adapters=names, batch_size=batch_size,
                             max_length=max_length)
            return -found["loss"] if names is None else {n: -v["loss"] for n, v in found.items()}
        return per_set(base, sets, score, chunk, progress)
    answers = torch.tensor([e.choices.index(e.target) for e in data])

    def score(model: ModularModel, names: list[str] | None) -> Any:
        found = choice_scores(model, data, tokenizer, adapters=names, batch_size=batch_size, max_length=max_length)
        return _choice_leep(found, answers) if names is None else {n: _choice_leep(t, answers)
                                                                    for n, t in found.items()}
    return per_set(base, sets, score, chunk, progress)


def _shortlist(base: nn.Module, data: list[GenerativeExample], items: list[tuple[str, Any]], tokenizer: Any,
               registry: Any, k: int, batch_size: int, max_length: int) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """The k candidates of highest retrieval key, best first, and (name, reason) of those without one."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"shortlist must be a positive int (how many candidates to score), got {k!r}")
    stored_by_sha = stored_by_weights(registry.root) if registry is not None else {}
    cards = {c.ref: c for c in registry.search(kind="lora", base_model=base, compatible_only=True)} \
        if registry is not None else {}
    keyed, signatures, excluded = [], [], []
    for name, value in items:
        try:
            signatures.append(_signature(base, value, registry, cards, stored_by_sha))
            keyed.append((name, value))
        except (IncompatibleModuleError, ConfigError) as e:
            excluded.append((name, str(e)))
    if not keyed:
        return [], excluded
    read = [replace(e, input=f"{e.input} {e.target}", chat=False) for e in data]
    hidden = hidden_states(base, tokenizer, read, sorted({s for p in signatures for s in p}), batch_size, max_length)
    keys = retrieval_keys(hidden, signatures)
    best = sorted(range(len(keyed)), key=lambda i: (-float(keys[i]), keyed[i][0]))[:k]
    return [keyed[i] for i in best], excluded
