"""DeepSpeed ZeRO-3 with pelthub modules: training with partitioned parameters, and merging.

    PYTHONPATH=. torchrun --standalone --nproc_per_node=2 benchmarks/deepspeed_zero3.py  # CPU (gloo), or a GPU per rank
    PYTHONPATH=. python -m benchmarks.deepspeed_zero3                                    # one rank (one GPU)

Needs `pip install deepspeed` (not a pelthub dependency: no test in `make test` uses it). On CPU,
DeepSpeed JIT-compiles its shared-memory communication op (g++) at the first `init_distributed`:
about 7 minutes on 2 busy cores, cached in $TORCH_EXTENSIONS_DIR afterwards.

Each case (IA3, LN-tuning, LoRA + head on tests/fsdp_worker.py's tiny BERT) trains its 3 SGD steps under ZeRO-3 with
`stage3_param_persistence_threshold=0`, so every tensor, the modules' included, is partitioned and
gathered per use; each rank takes its share of one global batch, and rank 0 also trains the same
model in one process on the whole batch. Rows: the largest difference of the module tensors
(gathered) from that single-process run, then of the logits after `merge_and_unload` inside
`deepspeed.zero.GatheredParameters` (the base's and the modules' tensors whole) from the
single-process model merged. `merge_and_unload` on partitioned weights is refused; the refusals
are printed. Exit status 1 if a difference exceeds 1e-5.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import torch

from pelthub.errors import PeltError
from tests.fsdp_worker import BATCH, LR, STEPS, build, data, train

CASES = ("ia3", "ln", "lora")  # tests/fsdp_worker.py's cases that merge
TOL = 1e-5


def single_process(case: str, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Module tensors after training on the whole batch, and the merged model's logits."""
    model = build(case)
    train(model, batch)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        return tensors, model.merge_and_unload()(input_ids=batch["input_ids"]).logits


def zero3(case: str, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[float, float | None, str]:
    """(tensor difference, merged-logits difference or None where the gathered merge was refused, refusals)."""
    import deepspeed
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config = {"train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": 1,
              "zero_allow_untested_optimizer": True, "optimizer": {"type": "SGD", "params": {"lr": LR}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    model = build(case)
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    mine = {k: v.chunk(world)[rank].to(device) for k, v in batch.items()}
    for _ in range(STEPS):
        engine.backward(engine(**mine).loss)
        engine.step()
    reference, merged_logits = single_process(case, batch) if rank == 0 else ({}, None)
    params = [p for _, p in model.module_parameters()]
    with deepspeed.zero.GatheredParameters(params):
        trained = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    refusals = [refusal(model.merge_and_unload)]
    merged = None
    with deepspeed.zero.GatheredParameters([*model.base.parameters(), *params], modifier_rank=0):
        refusals.append(refusal(model.merge_and_unload))  # every rank: LN's parametrisations come off everywhere
    if refusals[-1] == "":
        with torch.no_grad():
            merged = model.base(input_ids=batch["input_ids"].to(device)).logits.cpu()  # ZeRO gathers per layer
    if rank != 0:
        return 0.0, 0.0, ""
    tensor_diff = max((trained[k] - reference[k]).abs().max().item() for k in reference)
    return tensor_diff, None if merged is None else (merged - merged_logits).abs().max().item(), " / ".join(refusals)


def refusal(merge: Callable[[], object]) -> str:
    """'' when `merge()` merged, else the pelthub error it raised (its first 120 characters)."""
    try:
        merge()
        return ""
    except PeltError as e:
        return f"{type(e).__name__}: {str(e)[:120]}"


def main() -> int:
    import deepspeed
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29517"}.items():
        os.environ.setdefault(key, value)  # `python -m benchmarks.deepspeed_zero3`: one rank, no launcher
    deepspeed.init_distributed("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", torch.distributed.get_rank()) if torch.cuda.is_available() else torch.device("cpu")
    batch, worst = data(), 0.0
    if torch.distributed.get_rank() == 0:
        print("| case | module tensors vs one process | merged logits vs one process | merge refusals (plain / gathered) |")
    for case in CASES:
        tensors, merged, refusals = zero3(case, batch, device)
        worst = max(worst, tensors, merged or 0.0)
        if torch.distributed.get_rank() == 0:
            print(f"| {case} | {tensors:.2e} | {'refused' if merged is None else f'{merged:.2e}'} | {refusals} |",
                  flush=True)
    ok = worst <= TOL
    if torch.distributed.get_rank() == 0:
        print(f"ZeRO-3 on {device.type}, {torch.distributed.get_world_size()} ranks: "
              f"{'equal to one process' if ok else 'DIFFERS from one process'} (max {worst:.2e}, tolerance {TOL})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
