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
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from .errors import ConfigError, PeltError
from .hub import Registry
from .registry import Card
from .version import __version__

CELL = 40
# Terminal control: C0/C1 controls (ESC starts ANSI sequences) and lone surrogates; newlines kept in output.
_CONTROL_RE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


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


def clean(text: str) -> str:
    """`text` safe for a terminal: control characters (escape sequences, NUL, ...) removed; newlines kept."""
    return _CONTROL_RE.sub("", text)


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else clean(text))


def registry(args: argparse.Namespace) -> Registry:
    return Registry(args.registry)


def model_path(value: str, flag: str) -> bool:
    """Whether `value` names a local model folder; a path-like value that is no folder is a one-line error.

    Anything else (e.g. `org/name`) is left to be read as a Hub id or a model name.
    """
    path = Path(value).expanduser()
    if path.is_dir():
        return True
    if path.exists() or value.startswith(("/", "./", "../", "~", ".\\")) or value in (".", ".."):
        raise ConfigError(f"{flag} {value}: no such model folder; pass a folder holding config.json, or a Hub id")
    return False


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
    p.add_argument("--base", help="base model: a folder (its config gives the fingerprint, as for `rank`), a name, "
                                  "or an architecture fingerprint (sha256)")
    p.add_argument("--task")
    p.add_argument("--tag", action="append", default=[], help="required tag (repeat for several)")
    p.add_argument("--compatible-only", action="store_true", help="with --base: same fingerprint only")
    p.add_argument("--limit", type=int)


def _search(args: argparse.Namespace) -> int:
    base = args.base
    if base is not None and model_path(base, "--base"):
        from .hub.peft import weightless_base
        base = weightless_base(base)  # a weightless copy: the fingerprint and name rank would use
    cards = registry(args).search(kind=args.kind, base_model=base, task=args.task, tags=args.tag,
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
            ["description", card.description or "-"], ["source", _source(card)],
            ["created", card.created], ["pelthub", card.pelthub_version],
            ["versions", ", ".join(str(c.version) for c in reg.versions(card.name))]]
    rows += [[f"file {name}", f"{f['sha256'][:16]}  {f['size']:,} bytes"] for name, f in card.files.items()]
    emit(args, card_json(card), f"{card.ref}\n{table(['field', 'value'], rows, cell=None)}")
    return 0


def _source(card: Card) -> str:
    """Where a version came from: a Hub repo and commit, a folder, or this machine."""
    s = card.source or {}
    if all(isinstance(s.get(k), str) for k in ("repo_id", "commit", "endpoint")):
        return f"{s['repo_id']} at commit {s['commit']} on {s['endpoint']}"
    return json.dumps(s) if s else "added here"


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
    lines += [f"unaccounted blob: {p}" for p in report.unaccounted]
    if report.unaccounted:
        lines.append("the index lost commits (copied without index.sqlite-wal, or an older backup): restore "
                     "index.sqlite with its -wal; `pelthub gc` deletes nothing until then")
    lines += [f"stray (left alone): {p}" for p in report.stray]
    emit(args, report.to_dict(), "\n".join(lines))
    return 0 if report.ok else 1


def _gc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unaccounted", action="store_true",
                   help="also delete blobs the index never recorded (after `verify` reports them and you keep this "
                        "index as it is)")


def _gc(args: argparse.Namespace) -> int:
    report = registry(args).gc(unaccounted=args.unaccounted)
    emit(args, dataclasses.asdict(report),
         f"removed {report.blobs_removed} blobs ({report.bytes_freed:,} bytes), {report.temps_removed} temporary "
         f"files, {report.checkouts_removed} checkouts")
    return 0


def _rank_args(p: argparse.ArgumentParser) -> None:
    importlib.import_module("pelthub.transfer.cli").add_arguments(p)


def _rank(args: argparse.Namespace) -> int:
    model_path(args.base, "--base")
    return int(importlib.import_module("pelthub.transfer.cli").run(args))


def _demo_args(p: argparse.ArgumentParser) -> None:
    importlib.import_module("pelthub.demo").add_arguments(p, registry_option=False)


def _demo(args: argparse.Namespace) -> int:
    if getattr(args, "model", None) is not None:
        model_path(args.model, "--model")
    demo = importlib.import_module("pelthub.demo")  # heavy (models, data): only when asked for
    return int(demo.main(args) or 0)


# ----- the Hub and PEFT (pelthub.hub); tokens come from HF_TOKEN or `hf auth login` and are never printed -----
def _endpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", help="Hub URL (default: $HF_ENDPOINT, else https://huggingface.co)")
    p.add_argument("--timeout", type=float, help="seconds a Hub request may wait (default: $PELTHUB_HUB_TIMEOUT, "
                                                 "else 30)")


def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", help="NAME[@VERSION] in the registry")
    p.add_argument("repo_id", help="Hub repo, e.g. me/sst2-prompt (created if missing)")
    p.add_argument("--revision", help="branch to commit to (default: main; created if missing)")
    p.add_argument("--tag", help="tag to put on the new commit, e.g. v1.0")
    p.add_argument("--private", action="store_true", help="create the repo private")
    _endpoint_arg(p)


def _push(args: argparse.Namespace) -> int:
    commit = registry(args).push(args.ref, args.repo_id, revision=args.revision, private=args.private,
                                 endpoint=args.endpoint, tag=args.tag, timeout=args.timeout)
    emit(args, {"ref": args.ref, "repo_id": args.repo_id, "commit": commit},
         f"pushed {args.ref} to {args.repo_id} at commit {commit}")
    return 0


def _pull_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo_id", help="Hub repo holding a pushed pelthub module")
    p.add_argument("--revision", help="branch, tag or commit sha (default: main)")
    p.add_argument("--name", help="register under this name instead of the card's (needed when the card's name "
                                  "is taken here by a module from elsewhere)")
    p.add_argument("--max-depth", type=int, help="deepest chain of parents to follow (default: 32)")
    p.add_argument("--max-parents", type=int, help="most parents to fetch in all (default: 100)")
    _endpoint_arg(p)


def _pull(args: argparse.Namespace) -> int:
    reg = registry(args)
    ref = reg.pull(args.repo_id, revision=args.revision, endpoint=args.endpoint, name=args.name, timeout=args.timeout,
                   max_depth=args.max_depth, max_parents=args.max_parents)
    card = reg.get(ref)
    emit(args, card_json(card), f"pulled {args.repo_id} as {ref} (commit {card.source['commit']})")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ref", help="NAME[@VERSION] in the registry")
    p.add_argument("dir", help="folder to write")
    p.add_argument("--format", choices=["peft", "pelthub"], default="peft")
    p.add_argument("--task-type", help="PEFT task type (SEQ_CLS, CAUSAL_LM, ...; default: from the module)")


def _export(args: argparse.Namespace) -> int:
    from .hub import export
    out = export(args.ref, args.dir, format=args.format, registry=registry(args), task_type=args.task_type)
    emit(args, {"ref": args.ref, "dir": str(out), "format": args.format}, f"wrote {args.ref} to {out} ({args.format})")
    return 0


def _import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a PEFT adapter folder or Hub repo id, or a pelthub module folder")
    p.add_argument("--name", help="registry name (default: from the folder or repo name)")
    p.add_argument("--task", help="task the module was trained on")
    p.add_argument("--base", help="the base model (folder or Hub id; only its config is read) when the adapter's "
                                  "base_model_name_or_path is missing or not reachable here")
    p.add_argument("--revision", help="branch, tag or commit sha of a Hub repo")
    _endpoint_arg(p)


def _import(args: argparse.Namespace) -> int:
    from .hub import import_peft
    from .model.io import CONFIG_FILE
    reg = registry(args)
    source = Path(args.source)
    if args.base is not None:
        model_path(args.base, "--base")
    if (source / CONFIG_FILE).is_file():  # already pelthub's format
        if args.base is not None:
            raise ConfigError(f"{source} is a pelthub module, whose pelthub.json already records its base model; "
                              "leave out --base")
        ref = reg.add(source, name=args.name or source.resolve().name, task=args.task)
    else:
        ref = import_peft(args.source, registry=reg, name=args.name, base=args.base, task=args.task,
                          revision=args.revision, endpoint=args.endpoint, timeout=args.timeout)
    emit(args, card_json(reg.get(ref)), f"imported {args.source} as {ref}")
    return 0


def _hub_search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="base model id, e.g. sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--kind", help="module kind, e.g. lora or prompt")
    p.add_argument("--task")
    p.add_argument("--author", help="user or organisation")
    p.add_argument("--limit", type=int, default=100)
    _endpoint_arg(p)


def _hub_search(args: argparse.Namespace) -> int:
    from .hub import search
    found = search(base_model=args.base, kind=args.kind, task=args.task, author=args.author, endpoint=args.endpoint,
                   limit=args.limit, timeout=args.timeout)
    text = table(["repo", "kinds", "task", "base model", "modified"],
                 [[m.repo_id, ",".join(m.kinds) or "-", m.task or "-", m.base_model or "-",
                   (m.last_modified or "-")[:19].replace("T", " ")] for m in found]) if found else "no modules found"
    emit(args, [m.to_dict() for m in found], text)
    return 0


def _doctor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="two model families instead of four")


def _doctor(args: argparse.Namespace) -> int:
    from .selfcheck import report
    return report(quick=args.quick)


def _no_arguments(p: argparse.ArgumentParser) -> None:
    """For subcommands that take only the common options."""


COMMANDS: dict[str, Command] = {
    "list": Command("list registered modules", _list_args, _list),
    "search": Command("find modules by kind, base model, task, tags or text", _search_args, _search),
    "show": Command("show one module's card", _show_args, _show),
    "rm": Command("remove a module version (or every version of a name)", _rm_args, _rm),
    "verify": Command("re-hash every stored file and report damage", _no_arguments, _verify),
    "gc": Command("delete files no module references", _gc_args, _gc),
    "demo": Command("run the end-to-end demo", _demo_args, _demo),
    "push": Command("upload a module to the Hugging Face Hub", _push_args, _push),
    "pull": Command("download a module (and its parents) from the Hub, verified", _pull_args, _pull),
    "export": Command("write a module as a PEFT adapter or as pelthub files", _export_args, _export),
    "import": Command("register a PEFT adapter (folder or Hub repo) or a pelthub module folder", _import_args,
                      _import),
    "rank": Command("rank source prompts for a target task (JSONL, CSV, saved dataset) by a transferability metric",
                    _rank_args, _rank),
    "hub-search": Command("find pelthub modules on the Hub", _hub_search_args, _hub_search),
    "doctor": Command("print versions and check that pelthub is exact on them (non-zero exit if not)",
                      _doctor_args, _doctor),
}


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", metavar="PATH", help="registry directory (default $PELTHUB_HOME, else "
                                                           "~/.cache/pelthub)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    top = argparse.ArgumentParser(prog="pelthub", description="Reusable parameter-efficient modules.")
    top.add_argument("--version", action="version", version=f"pelthub {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help, parents=[common])
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr and a non-zero exit, never a traceback."""
    args = parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_a, **_k: _say(args, "warning", message)
        try:
            return args.run(args)
        except PeltError as e:
            _say(args, "error", e)
        except KeyboardInterrupt:
            _say(args, "error", "interrupted")
            return 130
        except Exception as e:  # noqa: BLE001 - a bug or an OS error: still one line, not a traceback
            _say(args, "error", f"{type(e).__name__}: {e}")
    return 1


def _say(args: argparse.Namespace, level: str, message: object) -> None:
    line = " ".join(str(message).split())  # one line, whatever the message held
    print(clean(f"pelthub {args.command}: {level}: {line}"), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
