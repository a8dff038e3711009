"""One rank of `tests/test_ddp.py`: transformers.Trainer under torchrun (gloo on CPU), default arguments.

    torchrun --standalone --nproc_per_node=2 tests/ddp_trainer_worker.py OUT_DIR

Each rank builds its modules from its own seed (so only DDP's broadcast can make them
equal), trains a few steps on its shard of a Poly dataset with a `task_ids` column,
and writes its module tensors before and after training to OUT_DIR/rank{R}-{init,final}.safetensors.
"""
from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pelthub as ph  # noqa: E402
from pelthub.tiny import VOCAB, bert, perturb  # noqa: E402


def rows(n: int = 32) -> list[dict[str, torch.Tensor]]:
    """Two tasks over the same inputs: task 0 labels whether token 5 appears, task 1 the opposite."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(6, VOCAB, (8,), generator=g)
        if i % 2:
            ids[3] = 5
        task = (i // 2) % 2
        out.append({"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long),
                    "labels": torch.tensor((i % 2) ^ task), "task_ids": torch.tensor(task)})
    return out


def main(out: str) -> None:
    import transformers
    rank = int(os.environ["RANK"])
    model = ph.compose(bert(), ph.Poly(tasks=("a", "b"), skills=2, rank=2), head=True)
    perturb(model, seed=rank)  # different modules per rank: only DDP's broadcast can make them equal
    args = transformers.TrainingArguments(output_dir=os.path.join(out, "trainer"), report_to=[], use_cpu=True,
                                          ddp_backend="gloo", max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=1e-2, save_strategy="no", dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, f"rank{rank}-init.safetensors"))
    trainer.train()
    assert torch.distributed.get_world_size() == 2, "not distributed"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, f"rank{rank}-final.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
