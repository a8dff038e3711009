"""transformers.Trainer with default arguments, alone or under torchrun / accelerate launch.

    python examples/trainer.py            # the real MiniLM, offline (~2.5 min: 159 s on 2 shared cores, load 13-14)
    python examples/trainer.py --tiny     # a tiny random BERT built from a config (seconds; for tests)
    torchrun --nproc_per_node=2 examples/trainer.py --tiny    # two CPU processes (gloo); or accelerate launch

Two sentiment tasks share one Poly model (LoRA skills routed per task). Every row carries its
`task_ids` as a dataset column: Trainer keeps it (and the attention mask and labels) because
`ModularModel.forward` names them. Only the modules and the head copy train; Trainer's
checkpoints hold just those tensors. At the end the main process saves the module with
`save_pretrained` and loads it onto a fresh base: the same accuracy.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from _setup import load  # sets offline mode and the import path, so it comes first

import transformers  # noqa: E402

import pelthub as ph  # noqa: E402
from pelthub.tasks import load_task  # noqa: E402
from pelthub.training import accuracy  # noqa: E402

TASKS = ("sentiment_movies", "sentiment_products")


def rows(tokenizer, tasks: dict, split: str) -> list[dict]:
    """One dict per example, padded to one length (Trainer's default collator stacks them)."""
    out = []
    for task_id, task in enumerate(tasks.values()):
        for e in getattr(task, split):
            enc = tokenizer(e.text, e.text_pair, padding="max_length", truncation=True, max_length=48)
            out.append({**enc, "labels": e.label, "task_ids": task_id})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("PELTHUB_EXAMPLE_TINY") == "1",
                        help="tiny random model and a few steps (also PELTHUB_EXAMPLE_TINY=1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 60, tiny 4)")
    args = parser.parse_args()
    steps = args.steps or (4 if args.tiny else 60)
    tokenizer, base = load(args.tiny)
    tasks = {name: load_task(name, n_train=128, n_test=64) for name in TASKS}

    model = ph.compose(base(2), ph.Poly(tasks=TASKS, skills=2, rank=4), head=True)
    with tempfile.TemporaryDirectory() as out:
        training = transformers.TrainingArguments(output_dir=out, max_steps=steps, learning_rate=3e-3,
                                                  per_device_train_batch_size=16, report_to=[], use_cpu=True,
                                                  save_steps=steps, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=training, train_dataset=rows(tokenizer, tasks, "train"))
        result = trainer.train()
        if not trainer.is_world_process_zero():
            return
        print(f"world size {training.world_size}: {steps} steps, training loss {result.training_loss:.4f}")
        checkpoint = sorted(os.listdir(out))[-1]
        print(f"{checkpoint}/model.safetensors holds {len(model.state_dict())} module tensors (no base weights)")
        test = {name: task.test for name, task in tasks.items()}
        trained = accuracy(model, test, tokenizer)
        model.save_pretrained(os.path.join(out, "final"))
        loaded = ph.from_pretrained(base(2), os.path.join(out, "final"))
        print(f"accuracy on both tasks {trained:.3f}; loaded back {accuracy(loaded, test, tokenizer):.3f}")


if __name__ == "__main__":
    main()
