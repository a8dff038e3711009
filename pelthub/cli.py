"""The `pelthub` command line: readable tables for people, `--json` for scripts.

Each subcommand is one `Command(help, add_arguments, run)` entry in
`COMMANDS`, so adding one (push, pull, rank, ...) touches nothing else.
`run` returns the exit status: 0 on success, 1 when the operation failed or
found problems (errors are printed as one line naming the fix, without a
traceback). No library module imports this one.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from typing import Any, Callable, NamedTuple, Sequence

from .errors import PeltError
from .registry import Card, Registry

CELL = 40


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ----- output helpers -----
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cell: int | None = CELL) -> str:
    """Left-aligned columns; cells longer than `cell` characters are cut (None: never)."""
    cells = [[_cut(str(c), cell) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _cut(text: str, width: int | None) -> str:
    return text if width is None or len(text) <= width else text[:width - 1] + "…"


def _base(card: Card) -> str:
    fp = card.base_model["fingerprint"]
    return card.base_model["name"] or f"{fp.get('model_type')}:{fp['sha256'][:8]}"


def _metrics(card: Card) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(card.metrics.items())) or "-"


def card_table(cards: Sequence[Card]) -> str:
    if not cards:
        return "no modules"
    return table(["ref", "kinds", "task", "base model", "params", "metrics", "created"],
                 [[c.ref, ",".join(c.kinds), c.task or "-", _base(c), f"{c.trainable_parameters:,}", _metrics(c),
                   c.created[:19].replace("T", " ")] for c in cards])


def card_json(card: Card) -> dict[str, Any]:
    return {"ref": card.ref, **card.to_dict()}


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def registry(args: argparse.Namespace) -> Registry:
    return Registry(args.registry)


# ----- subcommands -----
def _list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="every version, not only the latest of each name")


def _list(args: argparse.Namespace) -> int:
    cards = sorted(registry(args).search(), key=lambda c: (c.name, c.version))
    if not args.all:
        cards = list({c.name: c for c in cards}.values())  # the last (newest) of each name wins
    emit(args, [card_json(c) for c in cards], card_table(cards))
    return 0


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", help="words to find in names, descriptions, tasks, tags")
    p.add_argument("--kind", help="module kind, e.g. lora or prompt")
    p.add_argument("--base", help="base model name or architecture fingerprint (sha256)")
    p.add_argument("--task")
    p.add_argument("--tag", action="append", default=[], help="required tag (repeat for several)")
    p.add_argument("--compatible-only", action="store_true", help="with --base: same fingerprint only")
    p.add_argument("--limit", type=int)


def _search(args: argparse.Namespace) -> int:
    cards = registry(args).search(kind=args.kind, base_model=args.base, task=args.task, tags=args.tag,
                                  text=args.text, compatible_only=args.compatible_only, limit=args.limit)
    emit(args, [card_json(c) for c in cards], card_table(cards))
    return 0


def _show_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", help="NAME[@VERSION]; the latest version when @VERSION is left out")
    p.add_argument("--markdown", action="store_true", help="print the card as README.md (Hub model card)")


def _show(args: argparse.Namespace) -> int:
    reg = registry(args)
    card = reg.get(args.ref)
    if args.markdown:
        print(card.to_markdown())
        return 0
    fp = card.base_model["fingerprint"]
    rows = [["kinds", ", ".join(card.kinds)], ["task", card.task or "-"], ["base model", _base(card)],
            ["architecture", f"{fp.get('model_type')}, hidden {fp.get('hidden')}, {fp.get('layers')} layers"],
            ["fingerprint", fp["sha256"]], ["revision", card.base_model.get("revision") or "-"],
            ["trainable params", f"{card.trainable_parameters:,}"], ["metrics", _metrics(card)],
            ["tags", ", ".join(card.tags) or "-"], ["parents", ", ".join(p["ref"] for p in card.parents) or "-"],
            ["description", card.description or "-"], ["source", json.dumps(card.source) if card.source else "-"],
            ["created", card.created], ["pelthub", card.pelthub_version],
            ["versions", ", ".join(str(c.version) for c in reg.versions(card.name))]]
    rows += [[f"file {name}", f"{f['sha256'][:16]}  {f['size']:,} bytes"] for name, f in card.files.items()]
    emit(args, card_json(card), f"{card.ref}\n{table(['field', 'value'], rows, cell=None)}")
    return 0


def _rm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", help="NAME@VERSION, or NAME for every version of it")
    p.add_argument("--force", action="store_true", help="remove even if composed modules were built from it")


def _rm(args: argparse.Namespace) -> int:
    removed = registry(args).remove(args.ref, force=args.force)
    emit(args, {"removed": removed}, f"removed {', '.join(removed)} (run `pelthub gc` to free the space)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = registry(args).verify()
    lines = [f"{report.blobs_checked} blobs checked: "
             f"{'all intact' if report.ok else 'PROBLEMS FOUND'} ({report.unreferenced} unreferenced)"]
    lines += [f"corrupt blob: {p}" for p in report.corrupt]
    lines += [f"missing blob: {m}" for m in report.missing]
    lines += [f"bad card: {b}" for b in report.bad_cards]
    emit(args, report.to_dict(), "\n".join(lines))
    return 0 if report.ok else 1


def _gc(args: argparse.Namespace) -> int:
    report = registry(args).gc()
    emit(args, dataclasses.asdict(report),
         f"removed {report.blobs_removed} blobs ({report.bytes_freed:,} bytes), {report.temps_removed} temporary "
         f"files, {report.checkouts_removed} checkouts")
    return 0


def _demo(args: argparse.Namespace) -> int:
    demo = importlib.import_module("pelthub.demo")  # heavy (models, data): only when asked for
    return int(demo.main(args) or 0)


def _no_arguments(p: argparse.ArgumentParser) -> None:
    """For subcommands that take only the common options."""


COMMANDS: dict[str, Command] = {
    "list": Command("list registered modules", _list_args, _list),
    "search": Command("find modules by kind, base model, task, tags or text", _search_args, _search),
    "show": Command("show one module's card", _show_args, _show),
    "rm": Command("remove a module version (or every version of a name)", _rm_args, _rm),
    "verify": Command("re-hash every stored file and report damage", _no_arguments, _verify),
    "gc": Command("delete files no module references", _no_arguments, _gc),
    "demo": Command("run the end-to-end demo", _no_arguments, _demo),
}


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="PATH", help="registry directory (default $PELTHUB_HOME, else "
                                                           "~/.cache/pelthub)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    top = argparse.ArgumentParser(prog="pelthub", description="Reusable parameter-efficient modules.")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help, parents=[common])
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except PeltError as e:
        print(f"pelthub {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
