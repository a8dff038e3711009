"""Ranking a 10,000-module registry for a new target: exhaustive scoring vs a retrieved shortlist, side by side.

    PYTHONPATH=. .venv/bin/python -m benchmarks.rank_scale [--modules 10000] [--shortlist 64] [--registry DIR]

Base: a tiny GPT-2 (2 layers, width 64) over a word-level vocabulary of the real tasks' words, randomly
initialised. Sources: one LoRA (rank 2, attention and MLP input) trained 40 steps on each of `REAL`
real tasks (`pelthub.tasks.real`) cast as generative multiple-choice tasks (the text, then its label
name; the label names are the choices). The registry then holds `--modules` LoRAs: synthetic copies of
those sources, each its source plus Gaussian noise of 5-30% of each tensor's RMS (seeded per copy),
registered one by one (signatures are stored at `add`). Built once into `--registry` and reused.

Targets: the held-out real tasks of `TARGETS`, 32 training examples each. For each, `rank_sources`
with the default generative metric ("likelihood") is timed over every module (exhaustive) and with
`shortlist=K` (retrieval by routing signatures, then the same metric on K modules); regret is the
exhaustive score of the exhaustive top-1 minus the exhaustive score of the shortlist's top-1 (nats
per target token; target ≤ 0.01). Times include loading modules from the registry; they are wall
seconds on 1 thread (on a loaded machine 2 threads stall on each other), inflated alike by other
load (the last line gives the load average).
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import pelthub as ph
from pelthub.tasks.generative import GenerativeExample
from pelthub.tasks.real import load_real_task, real_task_info
from pelthub.training import fit

from .common import setup

REAL = ("wn_bio_tech", "wn_num_text", "wn_people_places", "code_modules", "deb_sections", "wn_verbs")
TARGETS = ("deb_bio_tech", "deb_num_text", "deb_topics")
VOCAB = 2000
WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: the `VOCAB` most common words of the tasks' training texts, and every label name."""
    counts = Counter(w for name in (*REAL, *TARGETS) for e in load_real_task(name).train for w in words(e.text))
    labels = {w for name in (*REAL, *TARGETS) for label in real_task_info(name)["label_names"] for w in words(label)}
    vocab = ["<pad>", "</s>", "<unk>", "->", *sorted(labels | {w for w, _ in counts.most_common(VOCAB)})]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def generative(name: str, n: int, seed: int = 0) -> list[GenerativeExample]:
    """A real task as multiple choice: the text (its first 24 words), then its label name."""
    task = load_real_task(name, n_train=n, seed=seed)
    labels = tuple(task.label_names)
    return [GenerativeExample(" ".join(words(e.text)[:24]) + " ->", labels[e.label], labels) for e in task.train]


def base_model(tok: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=1, pad_token_id=0)).eval()


def build(path: Path, n: int, base: GPT2LMHeadModel, tok: PreTrainedTokenizerFast) -> tuple[ph.Registry, list[str]]:
    """The registry of n synthetic copies of the trained sources (reused when it already holds n)."""
    registry = ph.Registry(path)
    if len(registry) >= n:
        return registry, [c.ref for c in registry.search(kind="lora")][:n]
    sources = []
    for i, name in enumerate(REAL):
        model = ph.attach(base, ph.LoRA(r=2, targets=("qkv", "up")))
        fit(model, generative(name, 128, i), tok, steps=40, batch_size=16, lr=5e-3, seed=i, progress=False)
        sources.append({k: v.detach().clone() for k, v in model.adapters["default"].state_dict().items()})
        model.detach()
    model = ph.attach(base, ph.LoRA(r=2, targets=("qkv", "up")))
    g = torch.Generator().manual_seed(0)
    started = time.time()
    for i in range(len(registry), n):
        scale = 0.05 + 0.25 * torch.rand((), generator=g)
        state = {k: v + scale * v.pow(2).mean().sqrt() * torch.randn(v.shape, generator=g)
                 for k, v in sources[i % len(sources)].items()}
        model.adapters["default"].load_state_dict(state)
        registry.add(model, name=f"copy{i:05d}-{REAL[i % len(REAL)]}", task=REAL[i % len(REAL)])
        if i % 1000 == 999:
            print(f"registered {i + 1} ({time.time() - started:.0f} s)", flush=True)
    model.detach()
    return registry, [c.ref for c in registry.search(kind="lora")][:n]


def main(n: int, k: int, path: Path, targets: int) -> None:
    setup(threads=1)
    tok = tokenizer()
    base = base_model(tok)
    registry, refs = build(path, n, base, tok)
    print(f"registry {path}: {len(refs)} LoRA modules; shortlist K = {k}")
    print("| target | exhaustive s | shortlist s | speed-up | regret (nats/token) | top-1 same |")
    print("|---|---|---|---|---|---|")
    for t, name in enumerate(TARGETS[:targets]):
        data = generative(name, 32, 100 + t)
        started = time.time()
        full = ph.rank_sources(base, data, refs, tokenizer=tok, registry=registry, eval_examples=32, batch_size=8,
                               chunk=64)
        middle = time.time()
        short = ph.rank_sources(base, data, refs, tokenizer=tok, registry=registry, eval_examples=32, batch_size=8,
                                chunk=64, shortlist=k)
        end = time.time()
        scores = dict(full.rows)
        regret = full.rows[0][1] - scores[short.rows[0][0]]
        print(f"| {name} | {middle - started:.1f} | {end - middle:.1f} | {(middle - started) / (end - middle):.0f}× "
              f"| {regret:.4f} | {short.rows[0][0] == full.rows[0][0]} |", flush=True)
    print(f"load: {os.getloadavg()[0]:.1f} (1-minute load average; 1 thread used here)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=10_000)
    parser.add_argument("--shortlist", type=int, default=64)
    parser.add_argument("--targets", type=int, default=len(TARGETS), help=f"the first N of {TARGETS}")
    parser.add_argument("--registry", type=Path, default=Path(tempfile.gettempdir()) / "pelthub_rank_scale",
                        help="built here once (about 0.1 s of CPU per module; 30 min at load 13-21), reused by later runs")
    args = parser.parse_args()
    main(args.modules, args.shortlist, args.registry, args.targets)
