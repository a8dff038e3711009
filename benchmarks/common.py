"""Small shared helpers for the benchmarks: thread setup, interleaved timing, a table printer.

Timing protocol (`interleaved`): every contender is warmed up, then measured once
per round, contenders alternating (and the order reversed every other round) so
that slow drift of the machine (thermal, other processes) hits all of them alike.
The garbage collector is off while measuring; the median is reported.
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

THREADS = 2


def setup(threads: int = THREADS, seed: int = 0) -> None:
    """Fix the intra-op thread count (the reference machine has 2 cores) and the seed."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


@contextmanager
def no_gc() -> Iterator[None]:
    """Collect once, then keep the garbage collector out of the measured region."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,   # what a user waits for; inflated when other processes share the cores
    "cpu": time.process_time,    # CPU seconds of this process (all threads); robust to being descheduled
}


def time_ms(fn: Callable[[], Any], clock: str = "wall") -> float:
    """Milliseconds of one call on `clock` ("wall" or "cpu")."""
    now = CLOCKS[clock]
    start = now()
    fn()
    return (now() - start) * 1000.0


def warmup(fns: Mapping[str, Callable[[], Any]] | Sequence[Callable[[], Any]], n: int = 3) -> None:
    """Call every function `n` times (alternating) and discard the timings."""
    calls = list(fns.values()) if isinstance(fns, Mapping) else list(fns)
    for _ in range(n):
        for fn in calls:
            fn()


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int = 10, warmup_steps: int = 3,
                clock: str = "wall") -> dict[str, list[float]]:
    """Per-call milliseconds of each function, measured in alternating rounds.

    Round i runs the functions in order, round i+1 in reverse order, and so on.
    """
    names = list(fns)
    warmup(fns, warmup_steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    with no_gc():
        for i in range(repeats):
            for name in (names if i % 2 == 0 else names[::-1]):
                times[name].append(time_ms(fns[name], clock))
    return times


def medians(fns: Mapping[str, Callable[[], Any]], repeats: int = 10, warmup_steps: int = 3,
            clock: str = "wall") -> dict[str, float]:
    """Median milliseconds of each function (see `interleaved`)."""
    return {name: median(ts) for name, ts in interleaved(fns, repeats, warmup_steps, clock).items()}


def summary(times: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """{name: {"median": ms, "min": ms}} of `interleaved` output.

    The median is the reported figure; the minimum (the least disturbed call) is
    a useful cross-check on a loaded machine.
    """
    return {name: {"median": median(ts), "min": float(min(ts))} for name, ts in times.items()}


def load_average() -> str:
    """The 1/5/15-minute load averages, for the report header (timings are noisy under load)."""
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "load average n/a"


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]],
                   digits: Mapping[str, int] | None = None) -> str:
    """A markdown table; `columns` are (row key, header) pairs, missing/None cells print as '—'.

    `digits` gives the decimals of float cells per row key (default 2).
    """
    digits = digits or {}
    header = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(fmt(r.get(k), digits.get(k, 2)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([header, rule, *body])


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]],
                digits: Mapping[str, int] | None = None) -> None:
    print(markdown_table(rows, columns, digits), flush=True)


def minilm_classifier(seed: int = 0, num_labels: int = 2) -> "torch.nn.Module":
    """BERT with MiniLM-L6 geometry (hidden 384, 6 layers, 12 heads), random init: no download needed."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def make_batch(batch: int, seq: int, seed: int = 1, padded: bool = False) -> dict[str, "torch.Tensor"]:
    """Random token ids with labels; `padded` masks the last quarter of half the rows."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        mask[batch // 2:, seq * 3 // 4:] = 0
    return {"input_ids": torch.randint(1000, 30522, (batch, seq), generator=g), "attention_mask": mask,
            "labels": torch.randint(0, 2, (batch,), generator=g)}
