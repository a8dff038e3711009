"""Registry latency: `search` over 10,000 cards and `add` of a 1 MB module.

Search: 10,000 synthetic cards (20 base architectures, 8 kinds, 50 tasks,
30 tags, free-text descriptions) are written straight into the index in one
transaction (the rows `add` would write, without 10,000 module files), then
each query shape is timed many times and its median reported; the target
applies to the median over all shapes. `search(base_model=model)` includes
computing the model's fingerprint. The unfiltered listing of every card is
shown too, for scale, but is not a search.

Add: a real module of 1 MiB (LoRA r=128 on q and v of a 2-layer BERT with
hidden 256: 262,144 float32 parameters), new weights every call, so each add
saves the module, hashes it, writes and fsyncs both blobs and commits one
SQLite transaction. The re-add of identical content (deduplicated) and a
verified `load` are shown for context.

    PYTHONPATH=. .venv/bin/python -m benchmarks.registry [--quick]
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from typing import Any, Callable

import torch
from transformers import BertConfig, BertForSequenceClassification

try:  # run as `python -m benchmarks.registry` or as a script
    from .common import median, no_gc, print_table, setup
except ImportError:  # pragma: no cover
    from common import median, no_gc, print_table, setup  # type: ignore

import pelthub as ph
from pelthub.sites import Sites
from pelthub.registry import Card

KINDS = ["lora", "prompt", "prefix", "bottleneck", "compacter", "ia3", "ln", "poly"]
WORDS = ["sentiment", "entailment", "paraphrase", "topic", "question", "toxicity", "grammar", "summary"]
TARGET_MS = 50.0


def build_base(hidden: int = 256, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=1000, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=128, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def synthetic_cards(n: int, anchor: dict[str, Any], seed: int = 0) -> list[Card]:
    """n cards spread over 20 architectures (the first is `anchor`, a real fingerprint)."""
    rng = random.Random(seed)
    bases = [{"name": f"org/model-{b}", "revision": None,
              "fingerprint": anchor if b == 0 else {**anchor, "sha256": f"{b:064x}", "hidden": 64 * b}}
             for b in range(20)]
    files = {"pelthub.json": {"sha256": "1" * 64, "size": 700}, "modules.safetensors": {"sha256": "2" * 64,
                                                                                         "size": 2 ** 20}}
    cards = []
    for i in range(n):
        kinds = sorted(rng.sample(KINDS, rng.choice([1, 1, 1, 2])))
        task = f"task-{rng.randrange(50)}"
        cards.append(Card(
            name=f"module-{i // 3}", version=i % 3 + 1, kinds=kinds,
            modules={"default": [{"kind": k} for k in kinds]}, heads={}, base_model=rng.choice(bases), task=task,
            tags=sorted(rng.sample([f"tag-{t}" for t in range(30)], 3)),
            metrics={"accuracy": round(rng.random(), 4)}, trainable_parameters=rng.randrange(10 ** 6),
            files=files, created="2025-01-01T00:00:00+00:00", pelthub_version=ph.__version__,
            description=f"{rng.choice(WORDS)} module for {task}"))
    return cards


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median milliseconds of `repeats` calls (after one warm-up call) and the last result."""
    result, times = fn(), []
    with no_gc():
        for _ in range(repeats):
            start = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - start) * 1e3)
    return median(times), result


def bench_search(reg: ph.Registry, n: int, repeats: int) -> list[dict[str, Any]]:
    model = build_base(hidden=32)
    anchor = Sites(model).fingerprint()
    cards = synthetic_cards(n, anchor)
    start = time.perf_counter()
    with reg.index.write() as index:
        for card in cards:
            index.insert(card)
    rows = [{"case": f"index {n:,} cards (one transaction, setup)", "ms": (time.perf_counter() - start) * 1e3}]
    queries = {
        "search(kind, base_model=<model>)": lambda: reg.search(kind="lora", base_model=model),
        "search(base_model=<fingerprint>, task)": lambda: reg.search(base_model=anchor["sha256"], task="task-7"),
        "search(base_model=<name>)": lambda: reg.search(base_model="org/model-3"),
        "search(task)": lambda: reg.search(task="task-7"),
        "search(tags=[2 tags])": lambda: reg.search(tags=["tag-1", "tag-2"]),
        "search(text)": lambda: reg.search(text="paraphrase module for task-1"),
        "search(kind, tags, text)": lambda: reg.search(kind="prompt", tags=["tag-3"], text="sentiment"),
        "search(limit=20)": lambda: reg.search(limit=20),
    }
    medians = []
    for name, fn in queries.items():
        ms, found = timed(fn, repeats)
        medians.append(ms)
        rows.append({"case": name, "results": len(found), "ms": ms})
    rows.append({"case": f"search: median over the {len(queries)} queries", "ms": median(medians),
                 "target": f"<= {TARGET_MS:g}", "ok": "yes" if median(medians) <= TARGET_MS else "NO"})
    ms, found = timed(lambda: reg.search(), max(3, repeats // 10))
    rows.append({"case": "list every card (search(), no filter; for scale)", "results": len(found), "ms": ms})
    return rows


def bench_add(reg: ph.Registry, repeats: int) -> list[dict[str, Any]]:
    base = build_base(hidden=256)
    model = ph.attach(base, ph.LoRA(r=128, targets=("q", "v")))
    params = [p for _, p in model.module_parameters()]
    size = sum(p.numel() * p.element_size() for p in params)
    step = iter(range(10 ** 9))

    def add_new() -> str:
        with torch.no_grad():
            params[0].view(-1)[0] = next(step)  # new content: a new blob and a new version each time
        return reg.add(model, name="one-mb", task="bench")

    add_ms, ref = timed(add_new, repeats)
    readd_ms, again = timed(lambda: reg.add(model, name="one-mb", task="bench"), repeats)
    assert again == ref
    load_ms, _ = timed(lambda: reg.load(ref, base), max(3, repeats // 2))
    return [{"case": f"add: {size / 2 ** 20:.2f} MiB module, new content", "ms": add_ms, "target": f"<= {TARGET_MS:g}",
             "ok": "yes" if add_ms <= TARGET_MS else "NO"},
            {"case": "add: identical content again (returns the existing ref)", "ms": readd_ms},
            {"case": "load: verify blobs + attach to the base", "ms": load_ms}]


COLUMNS = [("case", "case"), ("results", "results"), ("ms", "median ms"), ("target", "target ms"), ("ok", "ok")]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 50, quick 10)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args(argv)
    setup()
    repeats = args.repeats or (10 if args.quick else 50)
    with tempfile.TemporaryDirectory() as search_home, tempfile.TemporaryDirectory() as add_home:
        rows = bench_search(ph.Registry(search_home), args.cards, repeats)
        rows += bench_add(ph.Registry(add_home), max(5, repeats // 2))
    print_table(rows, COLUMNS, digits={"ms": 2})
    return rows


if __name__ == "__main__":
    main()
