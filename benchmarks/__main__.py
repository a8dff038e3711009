"""Run every benchmark and print one combined report of ratios.

    PYTHONPATH=. .venv/bin/python -m benchmarks [--quick] [--only NAME ...]

NAME is a module of benchmarks/: modules, poly, attempt, unipelt, registry, transfer, compile (those
present run, in that order). The modules are invoked in two ways (the only glue here):

- a module with `run(quick)` returning its table rows (dicts) is called in-process; its rows
  that carry a "ratio" go into the combined table (benchmark | case | ratio | target | meets);
- any other module only has a command line: it runs as `python -m benchmarks.NAME` in a
  subprocess (with --quick when its source defines that option, else at its defaults), its
  output streams through, and every markdown table it printed is repeated verbatim, with
  the line just above it as caption, under the combined table.

transfer_evidence.py is a study of transferability metrics (about 10 minutes), not a
ratio benchmark: run it on its own. Exit status 1 if any benchmark failed.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import load_average, print_table

NAMES = ("modules", "poly", "attempt", "unipelt", "registry", "transfer", "compile")
HERE = Path(__file__).resolve().parent
COLUMNS = [("benchmark", "benchmark"), ("case", "case"), ("ratio", "ratio"), ("target", "target"),
           ("meets", "meets")]


def present() -> list[str]:
    return [name for name in NAMES if (HERE / f"{name}.py").exists()]


def in_process(name: str, module: Any, quick: bool) -> list[dict[str, Any]]:
    """Rows of `module.run(quick)` that carry a ratio, tagged with the benchmark name."""
    rows = module.run(quick)
    return [{"benchmark": name, "case": row.get("case", row.get("method")), "ratio": row["ratio"],
             "target": row.get("target"), "meets": row.get("meets")}
            for row in rows if row.get("ratio") is not None]


def as_subprocess(name: str, module: Any, quick: bool) -> tuple[int, list[str]]:
    """Exit status and the captioned markdown tables of `python -m benchmarks.NAME`, output streamed through."""
    args = ["--quick"] if quick and '"--quick"' in inspect.getsource(module) else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=HERE.parent, env=env,
                               stdout=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    return process.wait(), tables(lines)


def tables(lines: list[str]) -> list[str]:
    """Each markdown table in `lines`, verbatim, preceded by the last non-empty line above it."""
    blocks: list[str] = []
    caption = ""
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            caption = line if line.strip() else caption
        elif i == 0 or not lines[i - 1].startswith("|"):
            blocks.append(f"{caption}\n{line}" if caption else line)
        else:
            blocks[-1] += f"\n{line}"
    return blocks


def main(argv: list[str] | None = None) -> int:
    available = present()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer repeats, where supported")
    parser.add_argument("--only", nargs="+", choices=available, metavar="NAME",
                        help=f"benchmarks to run (default all): {' '.join(available)}")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    verbatim: dict[str, list[str]] = {}
    failed: list[str] = []
    start = time.perf_counter()
    for name in args.only or available:
        print(f"\n===== benchmarks.{name} {'(quick) ' if args.quick else ''}=====", flush=True)
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            if callable(getattr(module, "run", None)):
                rows += in_process(name, module, args.quick)
            else:
                code, verbatim[name] = as_subprocess(name, module, args.quick)
                if code:
                    failed.append(f"{name} (exit {code})")
        except Exception:
            traceback.print_exc()
            failed.append(f"{name} ({sys.exc_info()[0].__name__})")

    print(f"\n===== combined report ({time.perf_counter() - start:.0f} s; {load_average()}) =====\n")
    if rows:
        print_table(rows, COLUMNS, digits={"ratio": 3})
    for name, blocks in verbatim.items():
        print(f"\n## benchmarks.{name}, as printed\n")
        print("\n\n".join(blocks) if blocks else "(no table printed)")
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
