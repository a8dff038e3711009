"""One rank of `tests/test_fsdp.py`: pelthub modules trained under FSDP2 and FSDP1 (gloo on CPU).

    torchrun --standalone --nproc_per_node=2 tests/fsdp_worker.py OUT_DIR

For each case (a module kind) and each wrapper (`fully_shard`, FSDP1 with use_orig_params) every
rank builds the same model, wraps it, and takes a few SGD steps on its half of one global batch;
FSDP averages the gradients, so the steps are those of one process on the whole batch. Rank 0
also runs that single process (no wrapper, no collective), and writes:

- OUT_DIR/reference-CASE.safetensors: the single-process module tensors and the probe logits;
- OUT_DIR/WRAPPER/CASE/: `save_pretrained` of the sharded model;
- OUT_DIR/storage.json: per rank, how many base elements it holds, with three module sets attached,
  and what `merge_and_unload` and attaching one more set said on the sharded model.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pelthub as ph  # noqa: E402
from pelthub.errors import PeltError  # noqa: E402
from pelthub.tiny import VOCAB, bert, perturb  # noqa: E402

TASKS = ("a", "b")
CASES = {
    "lora": lambda base: ph.attach(base, ph.LoRA(r=2), head=True),
    "ia3": lambda base: ph.attach(base, ph.IA3()),
    "ln": lambda base: ph.attach(base, ph.LNTuning()),
    "prompt": lambda base: ph.attach(base, ph.Prompt(length=3)),
    "poly": lambda base: ph.compose(base, ph.Poly(tasks=TASKS, skills=2, rank=2)),
    "per_task": lambda base: ph.compose(base, ph.PerTask((ph.LoRA(r=2), ph.IA3(), ph.LNTuning()), tasks=TASKS)),
}
STEPS, LR, BATCH = 3, 0.5, 8


def data() -> dict[str, torch.Tensor]:
    """One global batch: BATCH examples of 6 tokens, a label and a task id each (both tasks on every rank)."""
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(3, VOCAB, (BATCH, 6), generator=g),
            "attention_mask": torch.ones(BATCH, 6, dtype=torch.long),
            "labels": torch.randint(0, 2, (BATCH,), generator=g),
            "task_ids": torch.arange(BATCH) % 2}


def base() -> torch.nn.Module:
    """Tiny BERT whose classifier weights are of unit size (BERT's init draws them at σ = 0.02, which leaves
    the modules behind it gradients too small to train in a few steps)."""
    model = bert(seed=1)
    with torch.no_grad():
        model.classifier.weight.mul_(50)
    return model


def build(case: str) -> ph.ModularModel:
    """The same model on every rank: the base from its seed, the modules moved off their identity start.
    In eval mode (the gradients are the same), where Poly routes without sampling: its training-mode
    noise is drawn per example from each rank's own generator."""
    model = CASES[case](base()).eval()
    perturb(model, seed=2)
    return model


def train(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def shard(model: ph.ModularModel, wrapper: str) -> torch.nn.Module:
    """FSDP2: each encoder layer its own unit, the rest (embeddings, modules, heads) the root's.
    FSDP1: the same units by an auto-wrap policy, the original parameters kept (use_orig_params)."""
    layer = type(model.base.bert.encoder.layer[0])
    if wrapper == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for block in model.base.bert.encoder.layer:
            fully_shard(block)
        return fully_shard(model)
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({layer}), use_orig_params=True,
                                    device_id=torch.device("cpu"))


def save(wrapped: torch.nn.Module, model: ph.ModularModel, directory: str) -> None:
    """FSDP2's parameters are DTensors (save_pretrained gathers them); FSDP1 needs its full-parameter context."""
    if wrapped is model:
        model.save_pretrained(directory)
        return
    from torch.distributed.fsdp import FullyShardedDataParallel
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False, rank0_only=True):
        if dist.get_rank() == 0:
            model.save_pretrained(directory)


def storage(out: str) -> None:
    """Three module sets on one base, sharded: each rank holds about half of the base's elements, once;
    merging into the shards, or attaching after sharding, is refused."""
    from torch.distributed.fsdp import fully_shard
    model = ph.attach(base(), ph.LoRA(r=2), name="one")
    ph.attach(model, ph.IA3(), name="two")
    ph.attach(model, ph.LoRA(r=4), name="three")
    total = sum(p.numel() for p in model.base.parameters())
    for block in model.base.bert.encoder.layer:
        fully_shard(block)
    fully_shard(model)
    local = sum(p.to_local().numel() for p in model.base.parameters())
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, local)
    said = {"merge": refusal(model.merge_and_unload),
            "attach": refusal(lambda: ph.attach(model, ph.IA3(), name="late"))}
    if dist.get_rank() == 0:
        with open(os.path.join(out, "storage.json"), "w") as f:
            json.dump({"base_elements": total, "local_elements": counts,
                       "base_tensors": len(list(model.base.parameters())), **said}, f)


def refusal(call: Callable[[], object]) -> str:
    """What `call()` raised (a pelthub error), or "done"."""
    try:
        call()
        return "done"
    except PeltError as e:
        return f"{type(e).__name__}: {e}"


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = data()
    mine = {k: v.chunk(world)[rank] for k, v in batch.items()}
    for case in CASES:
        if rank == 0:
            model = build(case)
            train(model, batch)
            with torch.no_grad():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            save_file({"logits": logits, **{k: v.detach().contiguous() for k, v in model.state_dict().items()}},
                      os.path.join(out, f"reference-{case}.safetensors"))
        for wrapper in ("fsdp2", "fsdp1"):
            model = build(case)
            wrapped = shard(model, wrapper)
            train(wrapped, mine)
            save(wrapped, model, os.path.join(out, wrapper, case))
    storage(out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
