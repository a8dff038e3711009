"""Training memory and step time of LST beside LoRA and full fine-tuning, side by side in one run.

    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python -m benchmarks.lst_memory

The model: BERT built from a config with MiniLM-L6's sizes (hidden 384, 6 layers, 12 heads, FFN 1536;
random weights, no download: `common.minilm_classifier`), in train mode (dropout on); one batch of
16 random inputs of 128 tokens, one step = forward, cross-entropy backward, AdamW step.

- LST: `ph.LST()` (r = 8, every layer laddered), trained head copy;
- LoRA: r = 8 on q, k, v, o, up and down, the same order of trainable parameters, trained head copy;
- full fine-tuning: every parameter of the base.

Activation memory is what autograd keeps for backward during the forward: every tensor handed to
`torch.autograd.graph.saved_tensors_hooks`' pack hook, counted once per storage (views of one
storage share it) and leaving out the model's own parameters (saved weights are not activations).
This is exact on the CPU, where no allocator statistics exist. Optimizer memory is the gradients
plus AdamW's two moments of the trainable parameters (3 × 4 bytes each). Step time: the median
CPU ms of this process (all its threads) over rounds that alternate the three (`common.interleaved`,
clock "cpu"): wall-clock time on a shared machine mostly measures the other processes (the load
average is printed).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

import pelthub as ph
from benchmarks.common import interleaved, load_average, make_batch, median, minilm_classifier, print_table, setup

BATCH, SEQ, REPEATS = 16, 128, 3
MIB = 2 ** 20


def saved_bytes(model: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def contenders() -> dict[str, nn.Module]:
    lora = ph.LoRA(r=8, targets=("q", "k", "v", "o", "up", "down"))
    full = minilm_classifier().train().requires_grad_(True)
    return {"LST (r=8)": ph.attach(minilm_classifier(), ph.LST(), head=True).train(),
            "LoRA (r=8, q k v o up down)": ph.attach(minilm_classifier(), lora, head=True).train(),
            "full fine-tuning": full}


def main() -> None:
    setup()
    batch = make_batch(BATCH, SEQ)
    rows: list[dict[str, Any]] = []
    steps: dict[str, Callable[[], None]] = {}
    for name, model in contenders().items():
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
        count = sum(p.numel() for p in trainable)
        rows.append({"method": name, "trainable": f"{count:,}",
                     "activations": saved_bytes(model, lambda model=model: model(**batch).loss) / MIB,
                     "optimizer": 3 * 4 * count / MIB})
    times = interleaved(steps, repeats=REPEATS, warmup_steps=1, clock="cpu")
    lora = rows[1]["activations"]
    for row in rows:
        row["vs_lora"] = row["activations"] / lora
        row["ms"] = median(times[row["method"]])
    print(f"MiniLM-L6 geometry (config-built), batch {BATCH} x {SEQ} tokens, train mode; {load_average()}")
    print_table(rows, [("method", "method"), ("trainable", "trainable params"),
                       ("activations", "activation memory (MiB)"), ("vs_lora", "x LoRA's"),
                       ("optimizer", "grads + AdamW (MiB)"), ("ms", "step (CPU ms, median)")],
                digits={"ms": 0, "activations": 1, "optimizer": 1})
    ratio = rows[0]["vs_lora"]
    print(f"LST activation memory / LoRA's = {ratio:.3f} (target <= 0.5: {'meets' if ratio <= 0.5 else 'MISSES'})")


if __name__ == "__main__":
    main()
