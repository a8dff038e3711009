"""Poly / MHR: one set of LoRA skills routed per task, trained on mixed-task batches.

    python examples/poly_multitask.py            # the real MiniLM, offline (about a minute on 2 cores)
    python examples/poly_multitask.py --tiny     # a tiny random BERT built from a config (seconds; for tests)

Shows: mixed-task batches carrying `task_ids`, optimizer groups with their own routing
learning rate (`param_groups`), the learned routing weights and their heatmap (PNG),
adding a fourth task few-shot (`add_task`), and exporting one task's routed adapter as a
plain LoRA (`export_task_lora`) that gives the same outputs without any routing.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from _setup import load  # sets offline mode and the import path, so it comes first

import torch  # noqa: E402

import pelthub as ph  # noqa: E402
from pelthub.routing import add_task, export_task_lora, plot_routing, poly_module  # noqa: E402
from pelthub.training import param_groups  # noqa: E402
from pelthub.tasks import load_task  # noqa: E402
from pelthub.training import accuracy, batches, encode, fit  # noqa: E402

TASKS = ["sentiment_movies", "form_question", "pair_paraphrase"]  # all binary: one shared classifier head
NEW_TASK = "sentiment_hotels"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("PELTHUB_EXAMPLE_TINY") == "1",
                        help="tiny random model and a few steps (also PELTHUB_EXAMPLE_TINY=1)")
    parser.add_argument("--steps", type=int, default=None, help="multi-task training steps (default 80, tiny 5)")
    parser.add_argument("--out", type=Path, default=Path("outputs/examples"), help="where routing.png goes")
    args = parser.parse_args()
    steps = args.steps or (5 if args.tiny else 80)
    tokenizer, base = load(args.tiny)
    tasks = {name: load_task(name, n_train=64, n_test=128) for name in TASKS}

    # 1. Poly over 3 tasks: 4 LoRA skills of rank 4, cut into 4 heads (MHR); one routing row per task.
    model = ph.compose(base(2), ph.Poly(tasks=TASKS, skills=4, rank=4, heads=4), head=True)
    print(f"tasks {model.task_names}; {model.trainable_parameters()}")

    # 2. Mixed-task batches ({task: examples} → every batch mixes tasks and carries task_ids);
    #    the routing logits learn faster than the skills.
    optimizer = torch.optim.AdamW(param_groups(model, 3e-3, lr_routing=0.1))
    stream = batches({n: t.train for n, t in tasks.items()}, tokenizer, batch_size=16, task_names=model.task_names)
    model.train()
    for step in range(steps):
        batch = next(stream)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 0:
            print(f"first batch: task_ids {batch['task_ids'].tolist()}")
    model.eval()
    for name, task in tasks.items():
        print(f"  {name:<18} accuracy {accuracy(model, {name: task.test}, tokenizer):.3f}")

    # 3. Routing weights (tasks × heads × skills, per adapted layer) and their heatmap.
    weights = poly_module(model).routing_weights()
    layer, w = next(iter(weights.items()))
    print(f"routing weights of {layer} (averaged over heads), rows = tasks, columns = skills:")
    for name, row in zip(model.task_names, w.mean(1)):
        print(f"  {name:<18} {' '.join(f'{x:.2f}' for x in row.tolist())}")
    args.out.mkdir(parents=True, exist_ok=True)
    plot_routing(model).savefig(args.out / "routing.png", dpi=120, bbox_inches="tight")
    print(f"saved {args.out / 'routing.png'}")

    # 4. A new task, few-shot: a routing row starting from the mean of the others; build the optimizer afresh.
    new = load_task(NEW_TASK, n_train=16, n_test=128)
    add_task(model, NEW_TASK, init="mean")
    fit(model, {NEW_TASK: new.train}, tokenizer, steps=max(steps // 4, 2), batch_size=16, lr=3e-3, lr_routing=0.1,
        progress=False)
    print(f"added {NEW_TASK} (16 examples): accuracy {accuracy(model, {NEW_TASK: new.test}, tokenizer):.3f}")

    # 5. That task's routed adapter as one plain LoRA (with the trained head): same outputs, no routing.
    exported = export_task_lora(model, NEW_TASK)
    inputs = encode(tokenizer, new.test[:8])
    inputs.pop("labels")
    with torch.no_grad():
        diff = (exported(**inputs).logits - model(**inputs, task_ids=[NEW_TASK] * 8).logits).abs().max().item()
    lora = exported.adapters[NEW_TASK]["lora"].config
    print(f"exported {NEW_TASK} as a plain LoRA (r={lora.r} on {len(lora.targets)} layers); "
          f"max |Δlogit| vs the routed model: {diff:.1e}")


if __name__ == "__main__":
    main()
