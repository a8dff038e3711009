"""Does reuse work, and does a metric see it? `evaluate`: a transfer study with controls.

For source tasks S and held-out target tasks T, over `seeds` seeds. A task is a built-in
one (its name), a `Task`, or, given as {name: data}, a 🤗 `DatasetDict` (its train and
validation splits, `pelthub.tasks.as_task`); a `Task` or dataset gives its first `n_train`
(sources) or `shots` (targets, one draw per seed) training and `n_dev` dev examples after
a seeded shuffle (`Task.sample`).


1. a prompt (with its head) is tuned on every source for `source_steps`; each run has its
   own initial prompt and head (seeded by role, task and seed), so similarities between
   prompts cannot come from a shared starting point;
2. per target t and seed r (few-shot data drawn with seed r), four starts are tuned for
   `target_steps` each and scored by dev accuracy:
   - random: a random prompt and a fresh head (the baseline a₀);
   - vocab: a prompt of vocabulary embeddings and a fresh head;
   - SPoT from every source s: the source's prompt and, when the label counts match, its
     head (a shared output space: label ids align within a family, and are arbitrary across
     families, which is what the other-family sources measure);
   - shuffled: SPoT from a prompt + head trained on a same-family source with its labels
     shuffled: the domain's inputs without its labels, a warm start without the task;
   and the sources' prompts + heads are also scored as they are (zero-shot, no tuning);
3. every metric scores every source for t with the random-start prompt of seed r as the
   target's task embedding (`rank_sources(target=...)`); leep and adjusted_leep, which read each
   source's own head and tune no target, rank the sources from a registry they were added to when
   trained (the path `pelthub rank` takes); scores are averaged over seeds.

Read out per target (not pooled over dependent pairs): the gain of each kind of start over
random (mean ± 95 % CI over (target, seed) cells, the sources of a group averaged first),
and per metric the AUC of same-family vs other-family sources, Spearman ρ of score with the
SPoT gain and with zero-shot accuracy (averaged over targets), and how often the top-scored
source is a same-family one (per (target, seed) and with seed-averaged scores).
"""
from __future__ import annotations

import math
import random
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..model import ModularModel, attach
from ..modules.prompt import Prompt
from ..registry import Registry
from ..tasks import Example, Task, as_task, load_task
from ..training import accuracy, fit
from .methods import init_from, prompt_tensor
from .metrics import Layers
from .rank import HEAD_METRICS, METRICS, rank_sources
from .stats import auc, fmt_ci, mean_ci, spearman

NAME = "study"


def run_seed(*parts: object) -> int:
    """A seed of its own for every run (role, task, seed): distinct initial prompts and heads."""
    return zlib.crc32(":".join(map(str, parts)).encode())


@dataclass
class TransferStudy:
    """Accuracies per [source, target, seed] (NaN for a task with itself) and per [target, seed]."""

    sources: list[str]
    targets: list[str]
    families: dict[str, str]
    chance: np.ndarray                   # (T,) 1 / number of labels
    baseline: np.ndarray                 # (T, R) random prompt + fresh head, tuned
    vocab: np.ndarray                    # (T, R) vocabulary prompt + fresh head, tuned
    shuffled: np.ndarray                 # (T, R) SPoT from a shuffled-label same-family prompt, tuned
    shuffled_zero: np.ndarray            # (T, R) that prompt + head as is
    transferred: np.ndarray              # (S, T, R) SPoT from source s, tuned
    zero_shot: np.ndarray                # (S, T, R) source prompt + head as is (NaN: label counts differ)
    scores: dict[str, np.ndarray]        # metric → (S, T, R)
    source_accuracy: np.ndarray          # (S, R') dev accuracy of each source prompt
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def related(self, s: int, t: int) -> bool:
        return self.families[self.sources[s]] == self.families[self.targets[t]]

    def _groups(self, t: int) -> tuple[list[int], list[int]]:
        """(same-family, other-family) source indices for target t, the target itself left out."""
        usable = [s for s in range(len(self.sources)) if self.sources[s] != self.targets[t]]
        return [s for s in usable if self.related(s, t)], [s for s in usable if not self.related(s, t)]

    def conditions(self) -> dict[str, list[float]]:
        """Gain over the random start (accuracy − a₀, or − chance for zero-shot) per (target, seed) cell."""
        out: dict[str, list[float]] = {k: [] for k in (
            "SPoT, same-family source", "SPoT, other-family source", "SPoT, shuffled-label prompt", "vocab init",
            "zero-shot, same-family source", "zero-shot, other-family source", "zero-shot, shuffled-label prompt")}
        for t in range(len(self.targets)):
            same, other = self._groups(t)
            for r in range(self.baseline.shape[1]):
                a0, chance = self.baseline[t, r], self.chance[t]
                out["SPoT, same-family source"].append(_mean(self.transferred[same, t, r]) - a0)
                out["SPoT, other-family source"].append(_mean(self.transferred[other, t, r]) - a0)
                out["SPoT, shuffled-label prompt"].append(self.shuffled[t, r] - a0)
                out["vocab init"].append(self.vocab[t, r] - a0)
                out["zero-shot, same-family source"].append(_mean(self.zero_shot[same, t, r]) - chance)
                out["zero-shot, other-family source"].append(_mean(self.zero_shot[other, t, r]) - chance)
                out["zero-shot, shuffled-label prompt"].append(self.shuffled_zero[t, r] - chance)
        return out

    def ranking(self) -> dict[str, dict[str, float]]:
        """Per metric: AUC and ρ within each target (averaged), top-1 same-family rates."""
        out = {}
        gains = self.transferred - self.baseline[None]
        for metric, score in self.scores.items():
            aucs, rho_gain, rho_zero, top_seed, top_avg = [], [], [], [], []
            for t in range(len(self.targets)):
                same, other = self._groups(t)
                usable = same + other
                avg = _row_means(score[:, t, :])
                aucs.append(auc(avg[same], avg[other]))
                rho_gain.append(spearman(avg[usable], _row_means(gains[usable, t, :])))
                zero = _row_means(self.zero_shot[usable, t, :])
                keep = np.isfinite(zero)
                rho_zero.append(spearman(avg[usable][keep], zero[keep]))
                if same and other:
                    top_avg.append(float(usable[int(np.argmax(avg[usable]))] in same))
                    top_seed += [float(usable[int(np.argmax(score[usable, t, r]))] in same)
                                 for r in range(score.shape[2])]
            out[metric] = {"auc": _mean(aucs), "rho_gain": _mean(rho_gain), "rho_zero_shot": _mean(rho_zero),
                           "top1_same_family_per_seed": _mean(top_seed), "top1_same_family_avg": _mean(top_avg)}
        return out

    def table(self) -> str:
        """Markdown: accuracies of the starts, gains with 95 % CIs, and the metrics' agreement."""
        lines = ["| start (tuned on the target unless zero-shot) | gain over random init, mean ± 95% CI | n cells |",
                 "|---|---:|---:|"]
        a0 = mean_ci(self.baseline.ravel())
        lines.append(f"| random init (accuracy, not gain) | {fmt_ci(a0[0], a0[1])} | {a0[2]} |")
        for name, cells in self.conditions().items():
            m, h, n = mean_ci(cells)
            lines.append(f"| {name} | {fmt_ci(m, h, signed=True)} | {n} |")
        lines += ["", "| metric | AUC same vs other family | ρ vs SPoT gain | ρ vs zero-shot acc | "
                  "top-1 same family (per seed) | top-1 same family (seed-avg) |", "|---|---:|---:|---:|---:|---:|"]
        for metric, r in self.ranking().items():
            lines.append(f"| {metric} | {_f(r['auc'])} | {_f(r['rho_gain'], True)} | {_f(r['rho_zero_shot'], True)} | "
                         f"{_f(r['top1_same_family_per_seed'])} | {_f(r['top1_same_family_avg'])} |")
        lines.append(f"\n{len(self.sources)} sources, {len(self.targets)} targets, {self.baseline.shape[1]} seeds; "
                     f"{self.seconds:.0f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:
            if isinstance(x, np.ndarray):
                return clean(x.tolist())
            if isinstance(x, list):
                return [clean(v) for v in x]
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            return None if isinstance(x, float) and math.isnan(x) else x
        return clean({"sources": self.sources, "targets": self.targets, "families": self.families,
                      "chance": self.chance, "baseline": self.baseline, "vocab": self.vocab,
                      "shuffled": self.shuffled, "shuffled_zero": self.shuffled_zero,
                      "transferred": self.transferred, "zero_shot": self.zero_shot, "scores": self.scores,
                      "source_accuracy": self.source_accuracy, "conditions": self.conditions(),
                      "ranking": self.ranking(), "settings": self.settings, "seconds": self.seconds})


def _row_means(x: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN (no warning) where a row has none."""
    count = np.isfinite(x).sum(-1)
    return np.where(count > 0, np.nansum(x, -1) / np.maximum(count, 1), np.nan)


def _mean(values: Any) -> float:
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else math.nan


def _f(x: float, signed: bool = False) -> str:
    return "—" if not math.isfinite(x) else f"{x:+.2f}" if signed else f"{x:.2f}"


@dataclass
class _Trained:
    """A tuned prompt and the state of its head (CPU copies)."""

    prompt: torch.Tensor
    head: dict[str, torch.Tensor]
    labels: int


def shuffled_labels(examples: Sequence[Example], seed: int) -> list[Example]:
    """The same inputs with their labels permuted: keeps the domain and the label balance, drops the task."""
    labels = [e.label for e in examples]
    random.Random(seed).shuffle(labels)
    return [Example(e.text, y, e.text_pair) for e, y in zip(examples, labels)]


Tasks = Union[Sequence[Union[str, Task]], Mapping[str, Any]]


def _tasks(entries: Tasks, what: str) -> dict[str, str | Task]:
    """name → built-in task name or Task; {name: DatasetDict or Task} values become Tasks of that name."""
    if isinstance(entries, Mapping):
        return {name: value if isinstance(value, Task) else as_task(value, name) for name, value in entries.items()}
    bad = [type(e).__name__ for e in entries if not isinstance(e, (str, Task))]
    if bad or isinstance(entries, str):
        raise DataError(f"{what} must be built-in task names or Tasks, or a {{name: DatasetDict}} mapping; got "
                        f"{bad or 'one str'}")
    return {e if isinstance(e, str) else e.name: e for e in entries}


def _draw(task: str | Task, n_train: int, n_dev: int, seed: int) -> Task:
    if isinstance(task, str):
        return load_task(task, n_train=n_train, n_dev=n_dev, n_test=0, seed=seed)
    return task.sample(n_train, n_dev, 0, seed)


def evaluate(base_factory: Callable[[int], nn.Module], tokenizer: Any, sources: Tasks,
             targets: Tasks, seeds: int = 3, source_seeds: int | None = None,
             metrics: Sequence[str] = METRICS, source_steps: int = 100, target_steps: int = 20,
             prompt: Prompt = Prompt(length=10), batch_size: int = 16, lr: float = 0.03, n_train: int = 256,
             shots: int = 64, n_dev: int = 128, layers: Layers = None, max_length: int = 48,
             progress: bool = True) -> TransferStudy:
    """Run the study described in the module docstring; returns its `TransferStudy`.

    base_factory(num_labels) builds the base (one per label count, reused, never edited).
    sources, targets: task names, Tasks, or {name: DatasetDict} (module docstring).
    source_seeds: how many seeds the source prompts are trained with (default `seeds`; 1
    reuses one set of sources for every target seed, for a quick run). Budget:
    source_steps·|S|·(source_seeds + |T|) + target_steps·|T|·seeds·(|S| + 3) steps.
    """
    source_tasks, target_tasks = _tasks(sources, "sources"), _tasks(targets, "targets")
    sources, targets = list(source_tasks), list(target_tasks)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not sources or not targets or seeds < 1:
        raise ConfigError(f"evaluate needs sources, targets, seeds >= 1 and metrics from {list(METRICS)}; got "
                          f"{len(sources)} sources, {len(targets)} targets, {seeds} seeds, unknown metrics {unknown}")
    source_seeds = seeds if source_seeds is None else source_seeds
    start = time.perf_counter()
    scratch = tempfile.TemporaryDirectory(prefix="pelthub-study-")  # removed at the end, or when collected
    registry = Registry(scratch.name)                                # the trained sources, for the leeps
    bases: dict[int, nn.Module] = {}
    source_data = {s: _draw(task, n_train, n_dev, 0) for s, task in source_tasks.items()}

    def tune(data: Sequence[Example], labels: int, seed: int, steps: int, what: str, init: Prompt = prompt,
             start_from: _Trained | None = None) -> ModularModel:
        """A fresh prompt + head (own seed), optionally started from a trained one, tuned for `steps`."""
        if labels not in bases:
            bases[labels] = base_factory(labels)
        torch.manual_seed(seed)
        model = attach(bases[labels], init, name=NAME, head=True, tokenizer=tokenizer)
        _reset_head(model, bases[labels])
        if start_from is not None:
            init_from(model, start_from.prompt)
            if start_from.labels == labels:
                model.heads[NAME].load_state_dict(start_from.head)
        if steps:
            fit(model, data, tokenizer, steps=steps, batch_size=batch_size, lr=lr, seed=seed, max_length=max_length,
                progress=what if progress else False)
        return model

    def keep(model: ModularModel, labels: int) -> _Trained:
        trained = _Trained(prompt_tensor(model).clone().cpu(),
                           {k: v.detach().clone().cpu() for k, v in model.heads[NAME].state_dict().items()}, labels)
        model.detach()
        return trained

    def dev_accuracy(model: ModularModel, task: Task) -> float:
        acc = accuracy(model, task.dev, tokenizer, max_length=max_length)
        model.detach()
        return acc

    trained: dict[tuple[str, int], _Trained] = {}
    refs: dict[tuple[str, int], str] = {}
    source_acc = np.full((len(sources), source_seeds), np.nan)
    for r in range(source_seeds):
        for i, s in enumerate(sources):
            task = source_data[s]
            model = tune(task.train, task.num_labels, run_seed("source", s, r), source_steps, f"source {s} #{r}")
            source_acc[i, r] = accuracy(model, task.dev, tokenizer, max_length=max_length)
            if any(m in HEAD_METRICS for m in metrics):
                refs[(s, r)] = registry.add(model, name=f"{s}-{r}", task=s)
            trained[(s, r)] = keep(model, task.num_labels)

    T, S = len(targets), len(sources)
    shape = (T, seeds)
    baseline, vocab, shuffled, shuffled_zero = (np.full(shape, np.nan) for _ in range(4))
    transferred, zero = np.full((S, T, seeds), np.nan), np.full((S, T, seeds), np.nan)
    scores = {m: np.full((S, T, seeds), np.nan) for m in metrics}
    families: dict[str, str] = {s: source_data[s].family for s in sources}
    chance = np.zeros(T)
    shuffled_sources: dict[tuple[str, int], _Trained] = {}
    cells = tqdm(total=T * seeds, desc="targets x seeds", disable=not progress)
    for t, name in enumerate(targets):
        for r in range(seeds):
            task = _draw(target_tasks[name], shots, n_dev, r)
            k, families[name], chance[t] = task.num_labels, task.family, 1.0 / task.num_labels
            sr = r % source_seeds
            pool = {sources[i]: trained[(sources[i], sr)] for i in range(S) if sources[i] != name}
            model = tune(task.train, k, run_seed("random", name, r), target_steps, f"{name} #{r} random")
            baseline[t, r] = accuracy(model, task.dev, tokenizer, max_length=max_length)
            for metric in [m for m in metrics if m not in HEAD_METRICS]:   # against the tuned target prompt
                ranking = rank_sources(model.base, task.train, {s: p.prompt for s, p in pool.items()}, metric,
                                       tokenizer=tokenizer, target=model, layers=layers, max_length=max_length,
                                       seed=r)
                for s, score in ranking.rows:
                    scores[metric][sources.index(s), t, r] = score
            model.detach()                                                  # the head metrics load onto its base
            for metric in [m for m in metrics if m in HEAD_METRICS]:   # every source, any head label count
                ranking = rank_sources(bases[k], task.train, {s: refs[(s, sr)] for s in pool}, metric,
                                       tokenizer=tokenizer, registry=registry, max_length=max_length)
                for s, score in ranking.rows:
                    scores[metric][sources.index(s), t, r] = score
            vocab[t, r] = dev_accuracy(tune(task.train, k, run_seed("vocab", name, r), target_steps,
                                            f"{name} #{r} vocab", Prompt(length=prompt.length, init="vocab")), task)
            for s, source in pool.items():
                i = sources.index(s)
                if source.labels == k:
                    zero[i, t, r] = dev_accuracy(tune(task.train, k, 0, 0, "", start_from=source), task)
                transferred[i, t, r] = dev_accuracy(tune(task.train, k, run_seed("spot", s, name, r), target_steps,
                                                         f"{s} -> {name} #{r}", start_from=source), task)
            sibling = next((s for s in pool if families[s] == task.family), None)
            if sibling is not None:
                if (sibling, sr) not in shuffled_sources:
                    data = source_data[sibling]
                    shuffled_sources[(sibling, sr)] = keep(tune(
                        shuffled_labels(data.train, run_seed("shuffle", sibling, sr)), data.num_labels,
                        run_seed("shuffled", sibling, sr), source_steps, f"{sibling} shuffled #{sr}"),
                        data.num_labels)
                control = shuffled_sources[(sibling, sr)]
                if control.labels == k:
                    shuffled_zero[t, r] = dev_accuracy(tune(task.train, k, 0, 0, "", start_from=control), task)
                shuffled[t, r] = dev_accuracy(tune(task.train, k, run_seed("spot-shuffled", name, r), target_steps,
                                                   f"shuffled -> {name} #{r}", start_from=control), task)
            cells.update()
    cells.close()
    scratch.cleanup()
    settings = {"seeds": seeds, "source_seeds": source_seeds, "source_steps": source_steps,
                "target_steps": target_steps, "prompt_length": prompt.length, "batch_size": batch_size, "lr": lr,
                "n_train": n_train, "shots": shots, "n_dev": n_dev}
    return TransferStudy(list(sources), list(targets), families, chance, baseline, vocab, shuffled, shuffled_zero,
                         transferred, zero, scores, source_acc, settings, time.perf_counter() - start)


@torch.no_grad()
def _reset_head(model: ModularModel, base: nn.Module) -> None:
    """Give the run's head copy its own initialisation (the base's init: N(0, initializer_range), zero bias)."""
    std = getattr(base.config, "initializer_range", 0.02)
    for module in model.heads[NAME].modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
