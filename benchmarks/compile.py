"""torch.compile speed-up: eager vs `torch.compile(model)` (inductor) per module kind, MiniLM geometry.

    PYTHONPATH=. python -m benchmarks.compile            # batch 16 x 64, 20 rounds
    PYTHONPATH=. python -m benchmarks.compile --quick    # batch 4 x 32, 8 rounds

A randomly initialised BERT with MiniLM's sizes (hidden 384, 6 layers), 2 threads, no
download. For LoRA, IA3, a soft prompt and Poly (two tasks, a mixed batch) the inference
forward (`torch.no_grad`) is timed eager and compiled, contenders alternating round by round
(benchmarks/common.py protocol); the compiled output is checked against eager (1e-4) before
timing. The table gives median milliseconds, the speed-up (eager / compiled), the
compile time (first call) and how many graphs dynamo compiled over all the timed calls
(fixed shapes: no recompiles after the first call). "ratio" is compiled / eager.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import pelthub as ph
from benchmarks.common import interleaved, load_average, median, minilm_classifier, print_table, setup

CASES = {"lora": lambda: ph.LoRA(r=8), "ia3": lambda: ph.IA3(), "prompt": lambda: ph.Prompt(length=10),
         "poly": lambda: ph.Poly(tasks=("a", "b"), skills=4, rank=8)}


class Counting:
    """A dynamo backend that counts the graphs it is handed and compiles each with inductor."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        from torch._inductor.compile_fx import compile_fx
        self.graphs += 1
        return compile_fx(gm, example_inputs)


def case(kind: str, batch: int, length: int, repeats: int) -> dict[str, Any]:
    torch._dynamo.reset()
    model = ph.compose(minilm_classifier(), CASES[kind](), head=True).eval()  # head=True: its own (random) head
    with torch.no_grad():
        for _, p in model.module_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(1000, 30000, (batch, length), generator=g),
              "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    if kind == "poly":
        inputs["task_ids"] = torch.arange(batch) % 2
    backend = Counting()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        start = time.perf_counter()
        got = compiled(**inputs).logits
        compile_s = time.perf_counter() - start
        torch.testing.assert_close(got, model(**inputs).logits, rtol=1e-4, atol=1e-4)
        graphs_after_first = backend.graphs
        times = interleaved({"eager": lambda: model(**inputs), "compiled": lambda: compiled(**inputs)},
                            repeats=repeats, warmup_steps=3)
    eager, fast = median(times["eager"]), median(times["compiled"])
    return {"case": kind, "eager_ms": eager, "compiled_ms": fast, "speedup": eager / fast, "ratio": fast / eager,
            "compile_s": compile_s, "recompiles": backend.graphs - graphs_after_first, "graphs": graphs_after_first}


def run(quick: bool = False) -> list[dict[str, Any]]:
    setup()
    batch, length, repeats = (4, 32, 8) if quick else (16, 64, 20)
    print(f"torch.compile (inductor) vs eager, inference forward, batch {batch} x {length}, MiniLM geometry, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; {load_average()}", flush=True)
    rows = [case(kind, batch, length, repeats) for kind in CASES]
    print_table(rows, [("case", "kind"), ("eager_ms", "eager ms"), ("compiled_ms", "compiled ms"),
                       ("speedup", "speed-up (eager / compiled)"), ("compile_s", "compile s (first call)"),
                       ("graphs", "graphs"), ("recompiles", "recompiles after the first call")],
                digits={"speedup": 2, "compile_s": 1})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 4 x 32 and fewer rounds")
    run(parser.parse_args().quick)


if __name__ == "__main__":
    main()
