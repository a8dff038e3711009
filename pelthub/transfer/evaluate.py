"""How well each metric predicts real transfer: `evaluate` over a set of built-in tasks.

For tasks T₁..T_n (each in turn source and target):

1. a source prompt P_s (with its head) is tuned on every task for `source_steps`;
2. per target t, a prompt with a random start is tuned for `target_steps`
   (accuracy a₀(t) on t's dev split); this is exactly the target prompt
   `rank_sources(target_steps=...)` would tune, and it is passed as `target=`
   to score every source with every metric;
3. per pair s ≠ t, the same run starts from P_s instead (`init_from`), with
   the same seed, data order and head: accuracy a(s, t).

    gain(s, t) = a(s, t) − a₀(t)          loss_gain(s, t) = ℓ₀(t) − ℓ(s, t)   (dev cross-entropy)

Per metric over the n(n−1) pairs: Spearman ρ(score, gain) and ρ(score,
loss_gain) (scipy.stats; the loss gain does not tie at 100 % accuracy), and
the top-1 hit rate: the share of targets whose top-scored source is the
source of the largest gain (with ties at the top, the share of tied sources
that are it). `pick_gain` is the mean gain of the top-scored source. The
reference row `same_family` scores 1 for two tasks of one family, else 0.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..model import ModularModel, attach
from ..modules.prompt import Prompt
from ..tasks import load_task
from ..training import accuracy, fit, mean_loss
from .methods import init_from, prompt_tensor
from .metrics import Layers
from .rank import METRICS, rank_sources

REFERENCE = "same_family"


@dataclass
class TransferStudy:
    """Measured transfer and each metric's agreement with it; matrices are indexed [source, target]."""

    tasks: list[str]
    families: list[str]
    baseline: np.ndarray                 # (n,) a₀(t): dev accuracy from a random start
    transferred: np.ndarray              # (n, n) a(s, t), NaN on the diagonal
    baseline_loss: np.ndarray            # (n,) dev cross-entropy from a random start
    transferred_loss: np.ndarray         # (n, n) dev cross-entropy starting from s, NaN on the diagonal
    scores: dict[str, np.ndarray]        # metric → (n, n) score(s, t), NaN on the diagonal
    source_accuracy: np.ndarray          # (n,) dev accuracy of each fully tuned source prompt
    source_prompts: torch.Tensor         # (n, L, d) P_s, tuned for source_steps
    target_prompts: torch.Tensor         # (n, L, d) each target's random-start prompt after target_steps
    spearman: dict[str, tuple[float, float]] = field(default_factory=dict)       # metric → (ρ, p) vs gains
    spearman_loss: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric → (ρ, p) vs loss_gains
    top1: dict[str, float] = field(default_factory=dict)
    pick_gain: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def gains(self) -> np.ndarray:
        """Accuracy gain a(s, t) − a₀(t)."""
        return self.transferred - self.baseline[None, :]

    @property
    def loss_gains(self) -> np.ndarray:
        """Dev loss reduction: loss₀(t) − loss(s, t) (not capped at 100 % accuracy, so less tied)."""
        return self.baseline_loss[None, :] - self.transferred_loss

    def add_scores(self, name: str, scores: np.ndarray) -> None:
        """Score the pairs with another metric (e.g. from `source_prompts` / `target_prompts`) and re-summarise."""
        self.scores[name] = np.where(np.eye(len(self.tasks), dtype=bool), np.nan, np.asarray(scores, dtype=float))
        self.summarise()

    def summarise(self) -> None:
        """Fill `spearman`, `spearman_loss`, `top1` and `pick_gain` from the matrices."""
        n = len(self.tasks)
        off = ~np.eye(n, dtype=bool)
        gains = self.gains
        best = [set(np.flatnonzero(np.isclose(gains[off[:, t], t], gains[off[:, t], t].max()))) for t in range(n)]
        for metric, score in self.scores.items():
            self.spearman[metric] = _spearman(score[off], gains[off])
            self.spearman_loss[metric] = _spearman(score[off], self.loss_gains[off])
            hits, picks = [], []
            for t in range(n):
                s, g = score[off[:, t], t], gains[off[:, t], t]
                top = np.flatnonzero(np.isclose(s, s.max()))
                hits.append(len(best[t] & set(top)) / len(top))
                picks.append(float(g[top].mean()))
            self.top1[metric], self.pick_gain[metric] = float(np.mean(hits)), float(np.mean(picks))

    def table(self) -> str:
        """Markdown: one row per metric, then the spread of the measured gains."""
        lines = ["| metric | ρ vs accuracy gain (p) | ρ vs loss gain (p) | top-1 hit rate | "
                 "accuracy gain of top pick |",
                 "|---|---:|---:|---:|---:|"]
        for metric in self.scores:
            (rho, p), (rho_l, p_l) = self.spearman[metric], self.spearman_loss[metric]
            lines.append(f"| {metric} | {rho:+.3f} ({p:.2g}) | {rho_l:+.3f} ({p_l:.2g}) | {self.top1[metric]:.2f} | "
                         f"{100 * self.pick_gain[metric]:+.1f} pts |")
        off = ~np.eye(len(self.tasks), dtype=bool)
        g = self.gains[off]
        best = np.where(off, self.gains, -np.inf).max(axis=0)
        lines.append(f"\n{len(self.tasks)} tasks, {off.sum()} pairs; accuracy gain mean {100 * g.mean():+.1f} pts "
                     f"(= a random pick), min {100 * g.min():+.1f}, max {100 * g.max():+.1f}; best source per "
                     f"target (oracle) {100 * best.mean():+.1f} pts; {self.seconds:.0f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def rows(m: np.ndarray) -> list[list[float | None]]:
            return [[None if math.isnan(v) else float(v) for v in row] for row in m]
        return {"tasks": self.tasks, "families": self.families, "baseline": self.baseline.tolist(),
                "baseline_loss": self.baseline_loss.tolist(), "source_accuracy": self.source_accuracy.tolist(),
                "transferred": rows(self.transferred), "transferred_loss": rows(self.transferred_loss),
                "gains": rows(self.gains), "loss_gains": rows(self.loss_gains),
                "scores": {m: rows(s) for m, s in self.scores.items()},
                "spearman": {m: {"rho": r, "p": p} for m, (r, p) in self.spearman.items()},
                "spearman_loss": {m: {"rho": r, "p": p} for m, (r, p) in self.spearman_loss.items()},
                "top1": self.top1, "pick_gain": self.pick_gain, "seconds": self.seconds}


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman ρ and its p-value; NaN when either side is constant."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    from scipy.stats import spearmanr  # scipy loads in ~0.5 s: only when a study is scored
    rho, p = spearmanr(x, y)
    return float(rho), float(p)


def evaluate(base_factory: Callable[[int], nn.Module], tokenizer: Any, tasks: Sequence[str],
             metrics: Sequence[str] = METRICS, source_steps: int = 100, target_steps: int = 40,
             prompt: Prompt = Prompt(length=10), batch_size: int = 16, lr: float = 0.03, n_train: int = 256,
             n_dev: int = 128, layers: Layers = None, seed: int = 0, max_length: int = 48,
             progress: bool = True) -> TransferStudy:
    """Measure the transfer gain of every (source, target) pair of `tasks` and score each metric against it.

    base_factory(num_labels) builds the base model (one is built per label
    count and reused; the base is never edited). Budget: n·source_steps +
    n²·target_steps prompt-tuning steps.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or len(tasks) < 3:
        raise ConfigError(f"evaluate needs >= 3 tasks and metrics from {list(METRICS)}; got {len(tasks)} tasks, "
                          f"unknown metrics {unknown}")
    start = time.perf_counter()
    data = [load_task(t, n_train=n_train, n_dev=n_dev, n_test=0) for t in tasks]
    bases: dict[int, nn.Module] = {}

    def run(i: int, source: torch.Tensor | None, steps: int, what: str) -> ModularModel:
        """Attach a fresh prompt (+ head) for task i, optionally start it from `source`, tune it."""
        k = data[i].num_labels
        if k not in bases:
            bases[k] = base_factory(k)
        torch.manual_seed(seed)
        model = attach(bases[k], prompt, name="study", head=True)
        if source is not None:
            init_from(model, source)
        fit(model, data[i].train, tokenizer, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
            max_length=max_length, progress=what if progress else False)
        return model

    def measure(model: ModularModel, i: int) -> tuple[float, float]:
        return (accuracy(model, data[i].dev, tokenizer, max_length=max_length),
                mean_loss(model, data[i].dev, tokenizer, max_length=max_length))

    n = len(tasks)
    sources, source_acc = [], np.zeros(n)
    for i in range(n):
        model = run(i, None, source_steps, f"source {tasks[i]}")
        source_acc[i] = accuracy(model, data[i].dev, tokenizer, max_length=max_length)
        sources.append(prompt_tensor(model).clone())
        model.detach()
    baseline, transferred = np.zeros(n), np.full((n, n), np.nan)
    baseline_loss, transferred_loss = np.zeros(n), np.full((n, n), np.nan)
    targets: list[torch.Tensor] = []
    scores = {m: np.full((n, n), np.nan) for m in metrics}
    pairs = tqdm(total=n * n, desc="transfer pairs", disable=not progress)
    for t in range(n):
        model = run(t, None, target_steps, f"target {tasks[t]}")
        baseline[t], baseline_loss[t] = measure(model, t)
        targets.append(prompt_tensor(model).clone())
        others = {tasks[s]: sources[s] for s in range(n) if s != t}
        for metric in metrics:
            ranking = rank_sources(model.base, data[t].train, others, metric, tokenizer=tokenizer, target=model,
                                   layers=layers, max_length=max_length, seed=seed)
            for name, score in ranking.rows:
                scores[metric][tasks.index(name), t] = score
        model.detach()
        pairs.update()
        for s in range(n):
            if s != t:
                model = run(t, sources[s], target_steps, f"{tasks[s]} -> {tasks[t]}")
                transferred[s, t], transferred_loss[s, t] = measure(model, t)
                model.detach()
                pairs.update()
    pairs.close()
    families = [d.family for d in data]
    scores[REFERENCE] = np.array([[1.0 if fs == ft else 0.0 for ft in families] for fs in families])
    np.fill_diagonal(scores[REFERENCE], np.nan)
    study = TransferStudy(list(tasks), families, baseline, transferred, baseline_loss, transferred_loss, scores,
                          source_acc, torch.stack(sources), torch.stack(targets),
                          seconds=time.perf_counter() - start)
    study.summarise()
    return study
