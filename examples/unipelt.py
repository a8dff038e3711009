"""UniPELT: LoRA, prefix tuning and an adapter in one model, each behind a learned gate.

    python examples/unipelt.py           # the real MiniLM, offline (~2.5 min: 151 s on 2 shared cores, load 12)
    python examples/unipelt.py --tiny    # a tiny random BERT built from a config (seconds; for tests)

Every submodule instance has a gate g ∈ (0, 1) computed from its input, so the model
learns per layer (and per example) how much of each method to use. After training,
`gate_values()` holds the gates of the latest forward; `force_gate` switches a part off.
"""
from __future__ import annotations

import argparse
import os

from _setup import load  # sets offline mode and the import path, so it comes first

import torch  # noqa: E402

import pelthub as ph  # noqa: E402
from pelthub.tasks import load_task  # noqa: E402
from pelthub.training import accuracy, encode, fit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("PELTHUB_EXAMPLE_TINY") == "1",
                        help="tiny random model and a few steps (also PELTHUB_EXAMPLE_TINY=1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 60, tiny 5)")
    args = parser.parse_args()
    steps = args.steps or (5 if args.tiny else 60)
    tokenizer, base = load(args.tiny)
    task = load_task("topic_news", n_train=256, n_test=128)

    # The paper's UniPELT(APL): LoRA r=8 on query and value, a 10-token prefix, a Pfeiffer adapter.
    config = ph.UniPELT(lora=ph.LoRA(r=8), prefix=ph.Prefix(length=10), adapter=ph.Bottleneck(reduction=16))
    model = ph.attach(base(task.num_labels), config, head=True)
    print(model.trainable_parameters())
    fit(model, task.train, tokenizer, steps=steps, batch_size=16, lr=2e-3)
    print(f"{task.name}: accuracy {accuracy(model, task.test, tokenizer):.3f} after {steps} steps")

    # Gates of one forward over 8 test examples: mean over the examples, per layer and part.
    module = model.adapters["default"]["unipelt"]
    inputs = encode(tokenizer, task.test[:8])
    inputs.pop("labels")
    with torch.no_grad():
        model(**inputs)
    print("mean gate per adapted site:")
    for site, parts in module.gate_values().items():
        print(f"  {site:<48} " + "  ".join(f"{part} {g.mean():.3f}" for part, g in parts.items()))

    # Switch the adapter off: how much does this model rely on it?
    module.force_gate("adapter", 0.0)
    print(f"accuracy with the adapter gated off: {accuracy(model, task.test, tokenizer):.3f}")
    module.force_gate("adapter", None)


if __name__ == "__main__":
    main()
