"""torch.compile on a model with modules: the same outputs as eager, compiled once for fixed shapes.

    python examples/compile.py           # the real MiniLM, inductor (~3 min: 172 s on 2 shared cores, load 13-17)
    python examples/compile.py --tiny    # a tiny random BERT, dynamo only (backend "eager"; seconds; for tests)

A LoRA and a Poly model (two tasks, a mixed batch) are compiled with `torch.compile(model)`.
Each compiled model's logits are checked against eager (1e-5), then both are timed over a few
batches of one shape: new task ids of the same shape reuse the compiled graphs. Both compile into
one graph per forward (Poly's task ids are graph inputs; see benchmarks/compile.py for every kind).
"""
from __future__ import annotations

import argparse
import os
import time

from _setup import load  # sets offline mode and the import path, so it comes first

import torch  # noqa: E402

import pelthub as ph  # noqa: E402
from pelthub.tasks import load_task  # noqa: E402
from pelthub.training import encode  # noqa: E402


def timed(fn, calls: int) -> float:
    """Median milliseconds of `calls` calls."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("PELTHUB_EXAMPLE_TINY") == "1",
                        help="tiny random model, dynamo without inductor (also PELTHUB_EXAMPLE_TINY=1)")
    args = parser.parse_args()
    backend = "eager" if args.tiny else "inductor"
    tokenizer, base = load(args.tiny)
    task = load_task("sentiment_movies", n_train=8, n_test=64)
    inputs = encode(tokenizer, task.test[:16])
    inputs.pop("labels")
    configs = {"LoRA": ph.LoRA(r=8), "Poly": ph.Poly(tasks=("a", "b"), skills=2, rank=8)}
    for name, config in configs.items():
        torch._dynamo.reset()
        model = ph.compose(base(2), config, head=True).eval()  # the new head is random: head=True makes it the model's own
        with torch.no_grad():  # move the modules off their identity init, so they show in the outputs
            for _, p in model.module_parameters():
                p.add_(torch.randn_like(p) * 0.02)
        routes = [torch.tensor([i % 2 for i in range(16)]), torch.ones(16, dtype=torch.long)]
        kw = [{"task_ids": ids} if name == "Poly" else {} for ids in routes]
        compiled = torch.compile(model, backend=backend)
        with torch.no_grad():
            start = time.perf_counter()
            for k in kw:
                torch.testing.assert_close(compiled(**inputs, **k).logits, model(**inputs, **k).logits,
                                           rtol=1e-5, atol=1e-5)
            first = time.perf_counter() - start
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            eager = timed(lambda: model(**inputs, **kw[0]), 5)
            fast = timed(lambda: compiled(**inputs, **kw[1]), 5)
            again = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        print(f"{name}: compiled == eager (1e-5); compiling took {first:.1f} s, {graphs} graph(s), "
              f"{again - graphs} more for new task ids; eager {eager:.1f} ms, compiled {fast:.1f} ms "
              f"per batch of 16 ({backend})")


if __name__ == "__main__":
    main()
