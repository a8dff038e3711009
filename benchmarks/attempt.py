"""ATTEMPT training step vs plain prompt tuning of the same length, MiniLM geometry.

    PYTHONPATH=. python benchmarks/attempt.py [--quick]

A randomly initialised BERT with MiniLM's sizes (hidden 384, 6 layers, 12
heads, intermediate 1536), batch 32 x 64 tokens (--quick: 8 x 32), 2 threads.
One step = forward with labels, backward, AdamW step. The target is
AttentionMix within 1.2x of prompt tuning: the mixture adds a (B, S+1)
softmax and an (S, L, d) weighted sum, while both pay for backpropagating
through the whole frozen model to the input.

Contenders alternate round by round (benchmarks/common.py protocol); the
median and the best step are reported (the best is steadier when other
processes share the cores). The last column times the mixture alone
(pooling, router, softmax, weighted sum; forward + backward, best of 20):
the whole overhead over prompt tuning, free of the noise of the full step.
"""
from __future__ import annotations

import argparse
from typing import Callable, Mapping

import torch

import pelthub as ph
from benchmarks.common import interleaved, median, minilm_classifier, print_table, setup

LENGTH = 20


def step(model: ph.ModularModel, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
    return run


def mixture(model: ph.ModularModel, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Forward + backward of the mixture alone: P_inst from the batch's input embeddings."""
    module = model.adapters["composed"]["attention_mix"]
    embeds = model.base.get_input_embeddings()(batch["input_ids"])

    def run() -> None:
        module.prompt(embeds, batch["attention_mask"], model.ctx).sum().backward()
    return run


def measure(fns: Mapping[str, Callable[[], None]], repeats: int, warm: int = 3) -> dict[str, tuple[float, float]]:
    """(median, best) wall ms per call after `warm` calls each; contenders alternate, order reversed each round."""
    times = interleaved(fns, repeats, warm)
    return {name: (median(ts), min(ts)) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 8 x 32 and fewer repeats")
    args = parser.parse_args()
    setup()
    b, n, repeats = (8, 32, 3) if args.quick else (32, 64, 10)
    base = minilm_classifier().train()
    d = base.config.hidden_size
    batch = {"input_ids": torch.randint(1000, 30000, (b, n)), "attention_mask": torch.ones(b, n, dtype=torch.long),
             "labels": torch.randint(0, 2, (b,))}
    models = {"prompt tuning": ph.attach(base, ph.Prompt(length=LENGTH))}
    for s in (4, 16):
        srcs = {f"src{i}": torch.empty(LENGTH, d).uniform_(-0.5, 0.5) for i in range(s)}
        models[f"AttentionMix, {s} sources"] = ph.compose(base, ph.AttentionMix(srcs, target=ph.Prompt(length=LENGTH)))
    times = measure({name: step(m, batch) for name, m in models.items()}, repeats)
    alone = measure({name: mixture(m, batch) for name, m in models.items() if name != "prompt tuning"}, 20, warm=10)
    ref_median, ref_best = times["prompt tuning"]
    rows = [{"method": name, "trainable": m.trainable_parameters().trainable, "median": times[name][0],
             "median_ratio": times[name][0] / ref_median, "best": times[name][1],
             "best_ratio": times[name][1] / ref_best, "mix": alone.get(name, (None, None))[1]}
            for name, m in models.items()]
    print(f"training step, MiniLM geometry, batch {b} x {n}, prompt length {LENGTH}, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    print_table(rows, [("method", "method"), ("trainable", "trainable params"), ("median", "step ms, median"),
                       ("median_ratio", "vs prompt tuning"), ("best", "step ms, best"),
                       ("best_ratio", "vs prompt tuning"), ("mix", "mixture alone ms, best")],
                digits={"median": 1, "median_ratio": 3, "best": 1, "best_ratio": 3, "mix": 1})


if __name__ == "__main__":
    main()
