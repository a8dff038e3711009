"""Arrow benchmark: sparse pelthub Arrow against PEFT's dense Arrow as the library grows, and search timing.

    python -m benchmarks.arrow                      # libraries of 8 and 64 LoRAs, batch 4 x 64
    python -m benchmarks.arrow --sizes 8 64 256     # add 256 (PEFT's dense Arrow gets slow and large)
    python -m benchmarks.arrow --quick              # fewer repeats, 10,000 signatures still

MiniLM geometry (BERT, hidden 384, 6 layers, FFN 1536) with random weights; 2 threads. Every
source is an all-linear LoRA (q, k, v, o, up, down; r = 8, α = 16) with random A and B; both
routers hold the same weights and route top-2 at temperature 1.

1. One forward (no grad) of a batch: one unmerged pelthub LoRA (the reference, ratio 1),
   pelthub Arrow (`ph.compose(base, ph.Arrow(loras, top_k=2))`: each source computes only the
   tokens routed to it) and PEFT's Arrow (`create_arrow_model` on the same LoRAs saved by PEFT:
   every source computes every token). Time: median of interleaved rounds on the process CPU
   clock (robust on a shared machine; wall clock beside it). Memory: "held" is the parameters
   and buffers of the model (base, sources, prototypes; exact), "forward peak" the largest
   resident-set growth during a forward, sampled about every 0.1 ms with glibc's mmap threshold
   lowered to 64 KiB (`mallopt`) so that large tensors are mapped and unmapped and each
   forward's peak is its own; the ratio is of their sum.
2. Search: `signatures.route_fractions` ranking 10,000 synthetic signatures (unit random
   prototypes at the 12 query / value sites) for the hidden states of a few example tokens,
   after the hidden states are computed, plus stacking the 10,000 signatures into the per-layer
   matrices (done once per search).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import torch

try:
    from . import common
except ImportError:  # run as a script
    import common  # type: ignore[no-redef]

import pelthub as ph
from pelthub.sites import Sites
from pelthub.registry import signatures

RANK, ALPHA, TOP_K = 8, 16.0, 2
TARGETS = ("q", "k", "v", "o", "up", "down")
PEFT_TARGETS = ["query", "key", "value", "dense"]  # also the pooler's dense: PEFT routes by last name (B = 0 there)
M_MMAP_THRESHOLD = -3


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mmap_threshold(size: int) -> None:
    """Allocations of at least `size` bytes are mmapped (freed ones return to the OS); heap trimmed.

    64 KiB for measuring memory; 32 MiB (glibc's dynamic maximum, what a warm process reaches) for timing.
    """
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, size)
    libc.malloc_trim(0)


def peak_mb(fn: Callable[[], Any], runs: int = 3) -> float:
    """Peak RSS growth (MiB) while fn runs: the largest of `runs` calls, sampled about every 0.1 ms.

    The GIL switch interval is cut to 10 µs meanwhile, so the sampling thread also runs between
    the forward's Python-level steps.
    """
    interval, best = sys.getswitchinterval(), 0
    sys.setswitchinterval(1e-5)
    try:
        for _ in range(runs):
            stop, start = threading.Event(), rss()
            peak = [start]

            def poll() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], rss())
                    time.sleep(0.0001)
            thread = threading.Thread(target=poll)
            thread.start()
            try:
                fn()
            finally:
                stop.set()
                thread.join()
            best = max(best, max(peak[0], rss()) - start)
    finally:
        sys.setswitchinterval(interval)
    return best / 2**20


def resident_mb(model: torch.nn.Module) -> float:
    """Parameters and buffers the model holds (base, modules, PEFT's cached prototypes), in MiB."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def random_loras(base: torch.nn.Module, n: int, seed: int = 0) -> list[Any]:
    """n all-linear LoRA modules with random A (kaiming) and B (N(0, 0.02²))."""
    torch.manual_seed(seed)
    sites = Sites(base)
    loras = [ph.LoRA(r=RANK, alpha=ALPHA, targets=TARGETS).build(base, sites) for _ in range(n)]
    with torch.no_grad():
        for lora in loras:
            for layer in lora.layers.values():
                layer.lora_b.normal_(0.0, 0.02)
    return loras


def peft_arrow(loras: list[Any], directory: str) -> torch.nn.Module:
    """PEFT's Arrow over the same LoRAs: written by PEFT, loaded by `create_arrow_model`."""
    from peft import ArrowConfig, LoraConfig, create_arrow_model, get_peft_model
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS)
    writer = get_peft_model(common.minilm_classifier(), cfg, adapter_name="t0")
    paths = []
    for i, lora in enumerate(loras):
        if i:
            writer.add_adapter(f"t{i}", cfg)
        with torch.no_grad():
            for key, layer in lora.layers.items():
                target = writer.base_model.model.get_submodule(key.replace("-", "."))
                target.lora_A[f"t{i}"].weight.copy_(layer.lora_a)
                target.lora_B[f"t{i}"].weight.copy_(layer.lora_b)
        paths.append(os.path.join(directory, f"t{i}"))  # PEFT writes adapters other than "default" in subfolders
    writer.save_pretrained(directory)
    del writer
    return create_arrow_model(common.minilm_classifier(), paths,
                              ArrowConfig(top_k=TOP_K, router_temperature=1.0, rng_seed=0)).eval()


def forward_rows(sizes: list[int], batch: int, seq: int, repeats: int) -> list[dict[str, Any]]:
    inputs = {k: v for k, v in common.make_batch(batch, seq).items() if k != "labels"}
    library = random_loras(common.minilm_classifier(), max(sizes))
    one = ph.compose(common.minilm_classifier(), library[0])

    def call(model: torch.nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return model(**inputs).logits
        run.model = model  # type: ignore[attr-defined]
        return run
    rows = [{"n": 1, "method": "one unmerged LoRA (pelthub)", "_fn": call(one)}]
    for n in sizes:
        ours = ph.compose(common.minilm_classifier(), ph.Arrow(library[:n], top_k=TOP_K))
        rows.append({"n": n, "method": f"pelthub Arrow (sparse), top-{TOP_K}", "_fn": call(ours)})
        with tempfile.TemporaryDirectory() as tmp:
            dense = peft_arrow(library[:n], tmp)
            rows.append({"n": n, "method": f"PEFT Arrow (dense), top-{TOP_K}", "_fn": call(dense)})
        fns = {str(i): r["_fn"] for i, r in enumerate(rows) if r["n"] in (1, n)}
        mmap_threshold(32 * 2**20)
        cpu = common.medians(fns, repeats=repeats, warmup_steps=2, clock="cpu")
        wall = common.medians(fns, repeats=repeats, warmup_steps=0)
        mmap_threshold(64 * 2**10)
        for key, fn in fns.items():
            rows[int(key)].update(ms=cpu[key], wall=wall[key], peak=peak_mb(fn), held=resident_mb(fn.model))
        for r in rows[-2:]:
            r["_fn"] = None  # free the models of this size before the next
    ref = rows[0]
    for r in rows:
        r["mb"] = r["held"] + r["peak"]
        r["time_x"], r["mem_x"] = r["ms"] / ref["ms"], r["mb"] / ref["mb"]
    return rows


def search_rows(n: int, tokens: list[int], repeats: int) -> list[dict[str, Any]]:
    base = common.minilm_classifier()
    sites = [s for found in Sites(base).resolve(("q", "v"), linear=True).values() for s in found]
    g = torch.Generator().manual_seed(0)
    sigs = [{s: torch.nn.functional.normalize(torch.randn(384, generator=g), dim=0) for s in sites} for _ in range(n)]
    start = time.perf_counter()
    table = signatures.table(sigs)
    stack_ms = (time.perf_counter() - start) * 1000
    rows = []
    for t in tokens:
        hidden = {s: torch.randn(t, 384, generator=g) for s in sites}
        ms = common.summary(common.interleaved({"rank": lambda: signatures.route_fractions(hidden, table, n)},
                                               repeats=repeats, warmup_steps=1))["rank"]
        rows.append({"n": n, "tokens": t, "sites": len(sites), "ms": ms["median"], "ms_min": ms["min"],
                     "stack_ms": stack_ms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--signatures", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=common.THREADS, help="1 on a busy machine")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    common.setup(args.threads)
    repeats = 3 if args.quick else 7
    print(f"# Arrow: MiniLM geometry, batch {args.batch} x {args.seq}, all-linear r={RANK} LoRAs, top-{TOP_K}; "
          f"{torch.get_num_threads()} threads; {common.load_average()}\n", flush=True)
    rows = forward_rows(args.sizes, args.batch, args.seq, repeats)
    common.print_table(rows, [("n", "library"), ("method", "method"), ("ms", "CPU ms / forward"),
                              ("wall", "wall ms"), ("time_x", "time ÷ one LoRA"), ("held", "held MiB"),
                              ("peak", "forward peak MiB"), ("mem_x", "(held + peak) ÷ one LoRA")],
                     digits={"ms": 1, "wall": 1, "held": 1, "peak": 1})
    print(f"\n# Search: route_fractions over {args.signatures:,} synthetic signatures (after hidden states)\n")
    common.print_table(search_rows(args.signatures, [64, 256], repeats),
                       [("n", "signatures"), ("sites", "layers"), ("tokens", "example tokens"),
                        ("ms", "ms (median)"), ("ms_min", "ms (min)"), ("stack_ms", "stacking ms (once)")],
                       digits={"ms": 1, "ms_min": 1, "stack_ms": 0})


if __name__ == "__main__":
    main()
