"""UniPELT's training step against its three parts alone.

Model: MiniLM geometry (BertConfig: vocab 30522, hidden 384, 6 layers, 12 heads,
FFN 1536, 512 positions), BertForSequenceClassification with 2 labels, random
init. Batch 32 x 64 tokens (`--quick`: 8 x 32, fewer repeats). Two threads.

Contenders, with the paper's settings: LoRA(r=8) on q and v; Prefix(length=10,
hidden=512) (reparameterised, as trained); Bottleneck(reduction=16) after the
FFN; UniPELT(APL) with those three behind gates. Training step = forward (with
labels) + backward + AdamW step on the module parameters. Every contender is a
deepcopy of one base, gets the same batch, and is timed in alternating rounds
(see benchmarks/common.py); medians are reported, of wall time and of the
process's CPU time (all threads; steadier than wall time on a shared machine).

Ratio = UniPELT(APL) / contender: what the gated combination costs relative
to each part alone (the sum of the parts is shown for reference).

    PYTHONPATH=. .venv/bin/python -m benchmarks.unipelt [--quick]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch

try:  # run as `python -m benchmarks.unipelt` or as a script
    from .common import make_batch, medians, minilm_classifier, print_table, setup
except ImportError:  # pragma: no cover
    from common import make_batch, medians, minilm_classifier, print_table, setup  # type: ignore

import pelthub as ph

LORA, PREFIX, ADAPTER = ph.LoRA(r=8), ph.Prefix(length=10, hidden=512), ph.Bottleneck(reduction=16)
UNIPELT = "UniPELT (APL)"
CONTENDERS = {  # the three parts first, then UniPELT
    "LoRA (r=8, q v)": LORA,
    "Prefix (L=10, MLP 512)": PREFIX,
    "Bottleneck (Pfeiffer, /16)": ADAPTER,
    UNIPELT: ph.UniPELT(lora=LORA, prefix=PREFIX, adapter=ADAPTER),
}


def train_step(model: ph.ModularModel, batch: dict[str, torch.Tensor], cpu_ms: list[float]) -> Callable[[], None]:
    """One training step; appends its process CPU milliseconds (all threads) to `cpu_ms`."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        start = time.process_time()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cpu_ms.append((time.process_time() - start) * 1000.0)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 8 x 32, 3 rounds")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, quick 3)")
    args = parser.parse_args()
    setup()
    batch_size, seq = (8, 32) if args.quick else (32, 64)
    repeats = args.repeats or (3 if args.quick else 7)
    base, batch = minilm_classifier(), make_batch(batch_size, seq, padded=True)
    models = {name: ph.attach(copy.deepcopy(base), cfg).train() for name, cfg in CONTENDERS.items()}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    steps = {name: train_step(m, batch, cpu[name]) for name, m in models.items()}
    ms = medians(steps, repeats=repeats, warmup_steps=1 if args.quick else 2)
    cpu_ms = {name: statistics.median(times[-repeats:]) for name, times in cpu.items()}
    rows = [{"method": name, "params": f"{models[name].trainable_parameters().trainable:,}", "ms": ms[name],
             "cpu": cpu_ms[name]} for name in models]
    rows.append({"method": "sum of the three parts", "ms": sum(r["ms"] for r in rows[:3]),
                 "cpu": sum(r["cpu"] for r in rows[:3])})
    for row in rows:
        row["ratio"], row["cpu_ratio"] = ms[UNIPELT] / row["ms"], cpu_ms[UNIPELT] / row["cpu"]
    print(f"UniPELT training step vs its parts: MiniLM geometry, batch {batch_size} x {seq}, "
          f"{torch.get_num_threads()} threads, median of {repeats} rounds")
    print_table(rows, [("method", "method"), ("params", "trainable params"), ("ms", "wall ms / step"),
                       ("ratio", "UniPELT / this (wall)"), ("cpu", "CPU ms / step"),
                       ("cpu_ratio", "UniPELT / this (CPU)")],
                digits={"ms": 1, "ratio": 2, "cpu": 1, "cpu_ratio": 2})


if __name__ == "__main__":
    main()
