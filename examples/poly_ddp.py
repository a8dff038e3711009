"""Multi-task Poly training with plain DistributedDataParallel on CPU (gloo).

    torchrun --nproc_per_node=2 examples/poly_ddp.py [--steps 30]

Each rank trains on its own shard of a mixed-task batch (three synthetic tasks on a tiny
randomly initialised BERT). DDP averages the gradients of the Poly skills, the routing logits
and the task head; the routing logits get their own learning rate (`param_groups`). At the end
every rank gathers its parameters and checks they are identical across ranks, and rank 0
checks that the loss fell.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import pelthub as ph  # noqa: E402
from pelthub.training import param_groups  # noqa: E402

TASKS = ("parity", "first-high", "last-high")


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (n, 8), task ids (n,), labels (n,): each task labels the same inputs its own way."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (n, 8), generator=g)
    tasks = torch.randint(0, len(TASKS), (n,), generator=g)
    rules = torch.stack([ids.sum(1) % 2, (ids[:, 0] >= 33).long(), (ids[:, -1] >= 33).long()], 1)
    return ids, tasks, rules.gather(1, tasks[:, None]).squeeze(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)  # different routing noise per rank; DDP broadcasts rank 0's weights

    model = ph.compose(tiny_bert(), ph.Poly(tasks=TASKS, skills=4, rank=4, heads=2), head=True).train()
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-2, lr_routing=0.1))
    ids, tasks, labels = make_data(32 * world, seed=0)
    shard = slice(rank * 32, (rank + 1) * 32)

    losses = []
    for _ in range(args.steps):
        out = ddp(input_ids=ids[shard], task_ids=tasks[shard], labels=labels[shard])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)

    flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    spread = max((g - gathered[0]).abs().max().item() for g in gathered)
    if rank == 0:
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        print(f"world={world} params={flat.numel()} loss {first:.4f} -> {last:.4f} max param spread {spread:.2e}")
        assert spread == 0.0, f"ranks diverged: max parameter difference {spread}"
        assert last < first, f"loss did not fall: {first:.4f} -> {last:.4f}"
        print("ok")
    del ddp  # free the reducer before its process group goes
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
