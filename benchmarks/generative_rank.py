"""Which generative ranking metric predicts the gain a source LoRA gives on a new task (tiny GPT-2, synthetic).

    PYTHONPATH=. .venv/bin/python -m benchmarks.generative_rank [--quick]

A tiny GPT-2 (2 layers, width 64, a 40-word vocabulary) is first trained whole on copying
letter sequences, so that it reads its tokens; then one LoRA is trained per source task,
each a different operation on a sequence of letters (reverse, shift by one, first, last, sort, ...).
Every target task is a held-out operation with answer choices (the right output and the other
operations' outputs as distractors). The gain of a source on a target is the target test loss
after `STEPS` fine-tuning steps of a LoRA started from the fresh init minus that of the same
LoRA started from the source's weights (positive: the source helps). Each metric of
`pelthub.transfer.generative` ranks the sources on the target's training examples, zero-shot;
the table gives, per metric, the Spearman ρ between its scores and the gains (mean over targets)
and how often its top-1 source is the source of largest gain. Synthetic tasks on a tiny model:
evidence about these metrics here, not about real tasks.
"""
from __future__ import annotations

import argparse
import random
import time
from typing import Callable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import pelthub as ph
from pelthub.generative import evaluate
from pelthub.tasks.generative import GenerativeExample
from pelthub.training import fit
from pelthub.transfer.generative import GENERATIVE_METRICS

from .common import setup

LETTERS = "abcdefghijklmnop"
Op = Callable[[list[str]], list[str]]


def shift(k: int) -> Op:
    return lambda xs: [LETTERS[(LETTERS.index(x) + k) % len(LETTERS)] for x in xs]


SOURCES: dict[str, Op] = {
    "reverse": lambda xs: xs[::-1], "shift1": shift(1), "first": lambda xs: xs[:1], "last": lambda xs: xs[-1:],
    "sort": sorted, "evens": lambda xs: xs[::2], "double": lambda xs: [x for x in xs for _ in "ab"],
    "shift5": shift(5)}
TARGETS: dict[str, Op] = {
    "shift2": shift(2), "last2": lambda xs: xs[-2:], "reverse_sort": lambda xs: sorted(xs)[::-1],
    "first2": lambda xs: xs[:2], "odds": lambda xs: xs[1::2], "reverse_shift1": lambda xs: shift(1)(xs[::-1])}
STEPS = 30


def tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "</s>", "<unk>", *LETTERS, *"qrstuvwxyz", "copy", ":", "->"]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def examples(op: Op, n: int, seed: int, distractors: list[Op] = ()) -> list[GenerativeExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        xs = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
        target = " ".join(op(xs))
        choices = list(dict.fromkeys([target, *(" ".join(d(xs)) for d in distractors)]))
        out.append(GenerativeExample(" ".join(xs) + " ->", target, tuple(choices) if distractors else None))
    return out


def pretrained_base(tok: PreTrainedTokenizerFast, steps: int) -> GPT2LMHeadModel:
    """A tiny GPT-2 trained whole on copying, so its tokens mean something before any LoRA."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=1, eos_token_id=1, pad_token_id=0))
    fit(model, examples(lambda xs: xs, 2000, 0), tok, steps=steps, batch_size=32, lr=3e-3, progress=False)
    return model.eval()


def lora_after(base, tok, train, start: torch.nn.Module | None, steps: int, seed: int):
    """A LoRA fine-tuned `steps` steps on `train` from `start`'s weights (None: the fresh init)."""
    model = ph.attach(base, ph.LoRA(r=4))
    if start is not None:
        model.adapters["default"]["lora"].load_state_dict(start.state_dict())
    fit(model, train, tok, steps=steps, batch_size=16, lr=3e-3, seed=seed, progress=False)
    return model


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = (torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (x, y))
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def main(quick: bool = False) -> None:
    setup(threads=1)
    started = time.time()
    tok = tokenizer()
    base = pretrained_base(tok, 150 if quick else 400)
    sources = {}
    for i, (name, op) in enumerate(SOURCES.items()):
        model = lora_after(base, tok, examples(op, 512, 100 + i), None, 100 if quick else 200, i)
        sources[name] = model.adapters["default"]["lora"]
        model.detach()
    targets = dict(list(TARGETS.items())[:3] if quick else TARGETS.items())
    rho = {m: [] for m in GENERATIVE_METRICS}
    hits = dict.fromkeys(GENERATIVE_METRICS, 0)
    for t, (name, op) in enumerate(targets.items()):
        distractors = [o for o in SOURCES.values()][:3]
        train, test = (examples(op, n, 200 + 2 * t + k, distractors) for k, n in ((0, 64), (1, 128)))
        losses = {}
        for source in [None, *sources]:
            model = lora_after(base, tok, train, None if source is None else sources[source], STEPS, t)
            losses[source] = evaluate(model, test, tok, ("loss",))["loss"]
            model.detach()
        gains = {s: losses[None] - losses[s] for s in sources}
        best = max(gains, key=gains.get)
        line = [f"{name}: best source {best} (gain {gains[best]:+.3f})"]
        for metric in GENERATIVE_METRICS:
            scores = dict(ph.rank_sources(base, train, sources, metric, tokenizer=tok, eval_examples=64).rows)
            rho[metric].append(spearman([scores[s] for s in sources], [gains[s] for s in sources]))
            hits[metric] += max(scores, key=scores.get) == best
            line.append(f"{metric} ρ {rho[metric][-1]:+.2f}")
        print("; ".join(line), flush=True)
    print(f"\nsources {len(sources)}, targets {len(targets)}, {STEPS} fine-tuning steps per (target, source)")
    print("| metric | mean Spearman ρ (scores vs gains) | top-1 = largest gain |")
    print("|---|---|---|")
    for metric in GENERATIVE_METRICS:
        r = torch.tensor(rho[metric])
        print(f"| {metric} | {float(r.mean()):+.2f} ± {float(r.std()):.2f} | {hits[metric]} of {len(targets)} |")
    print(f"wall seconds: {time.time() - started:.0f} (1 thread)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 targets, shorter training")
    main(parser.parse_args().quick)
