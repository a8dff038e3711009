"""`Registry`: the local catalogue of modules, under `$PELTHUB_HOME` (default `~/.cache/pelthub`).

Layout: `blobs/` (module files by sha256), `index.sqlite` (cards, WAL mode),
`checkouts/` (verified, read-only module directories to load from) and `tmp/`.
An `add` writes every blob first and then the card in one SQLite
transaction, so a crash at any point leaves the entry either absent or
complete; blobs nobody references are reclaimed by `gc`, which deletes only
blobs the index recorded (see `index.py`: a copied or restored index that lost
commits makes gc refuse, not delete the modules it forgot).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import networkx as nx
from torch import nn

from ..errors import ConfigError, ModuleFormatError, NotFoundError, RegistryError
from ..model import ModularModel, from_pretrained
from ..model.io import (CONFIG_FILE, WEIGHTS_FILE, base_model_info, check_compatible, check_finite, read_description,
                        read_header)
from ..modules import jsonsafe
from ..version import __version__
from . import signatures
from .blobs import BlobStore, file_sha256
from .card import FIELDS, SHA_RE, Card, check_name, parse_ref
from .index import Index

DEFAULT_HOME = "~/.cache/pelthub"
MODULE_FILES = (CONFIG_FILE, WEIGHTS_FILE)


@dataclass(frozen=True)
class VerifyReport:
    """What `Registry.verify()` found; `ok` when nothing is corrupt, missing or unreadable."""

    blobs_checked: int
    corrupt: list[str]       # blob paths whose bytes no longer hash to their name
    missing: list[str]       # "ref: file (blob path)" for files a card needs that are gone
    bad_cards: list[str]     # cards that fail validation, with the field named
    unreferenced: int        # blobs no card uses (`gc` removes those the index accounts for)
    unaccounted: list[str]   # blob paths the index never recorded: it lost commits (see `Registry.gc`)
    stray: list[str]         # entries under blobs/ and checkouts/ pelthub did not write; left alone

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.missing or self.bad_cards or self.unaccounted)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class GcReport:
    """What `Registry.gc()` removed."""

    blobs_removed: int
    bytes_freed: int
    temps_removed: int
    checkouts_removed: int


class Registry:
    """Local, content-addressed store of module versions, safe for concurrent writers.

    `add` returns a ref "name@version"; refs without "@version" mean the
    latest version. Cards (`get`, `search`, `versions`) describe modules;
    `load` attaches one to a base model after checking its architecture.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        if path is not None and not os.fspath(path):
            raise ConfigError("the registry path is empty; pass a directory, or leave it out for $PELTHUB_HOME "
                              f"(default {DEFAULT_HOME})")
        self.root = Path(path or os.environ.get("PELTHUB_HOME") or DEFAULT_HOME).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"the registry path {self.root} is a file, not a directory; pass a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegistryError(f"cannot create the registry at {self.root}: {e.strerror}; pass a directory you "
                                "can write (path=, $PELTHUB_HOME)") from None
        self.blobs = BlobStore(self.root)
        self.index = Index(self.root / "index.sqlite")
        self.index.count()  # open (and create) the index now, so a bad location fails here

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r}, {len(self)} module versions)"

    def __len__(self) -> int:
        return self.index.count()

    def __contains__(self, ref: str) -> bool:
        name, version = parse_ref(ref)
        return self.index.get(name, version) is not None

    # ----- adding -----
    def add(self, module: ModularModel | str | os.PathLike, *, name: str, task: str | None = None,
            tags: Iterable[str] | str | None = None, metrics: Mapping[str, float] | None = None, description: str = "",
            parents: Iterable[str | Mapping[str, Any]] | None = None,
            source: Mapping[str, Any] | None = None) -> str:
        """Register a module (a ModularModel, or a directory written by `save_pretrained`); returns its ref.

        Adding content whose card would be identical (same files, name, task,
        tags, metrics, parents, ...) returns the existing ref instead of a new
        version. `parents` (refs, or {"ref", "sha256"}) default to the
        `parents` recorded in the module's pelthub.json.
        """
        check_name(name)
        tags = [tags] if isinstance(tags, str) else list(dict.fromkeys(tags or ()))
        metrics = {k: float(v) if isinstance(v, numbers.Real) and not isinstance(v, int) else v
                   for k, v in dict(metrics or {}).items()}  # numpy floats become plain floats
        for field, value in (("task", task), ("tags", tags), ("metrics", metrics), ("description", description),
                             ("source", None if source is None else dict(source))):
            problem = FIELDS[field](value)
            if problem:
                raise ConfigError(f"add(): {field}= must be {problem}, got {value!r}")
        resolved, local = (None, set()) if parents is None else self._parents(parents)
        with tempfile.TemporaryDirectory(dir=self.blobs.tmp, prefix=f"{os.getpid()}-") as tmp:
            directory = self._module_dir(module, Path(tmp), resolved)
            info = read_description(directory)
            if resolved is None:
                resolved, local = self._parents(info.get("parents") or [])
            counted = _trainable_parameters(info, directory / WEIGHTS_FILE)
            ours = directory == Path(tmp)  # written and fsynced by save_pretrained: link, don't copy
            shas = {f: file_sha256(directory / f) for f in MODULE_FILES}
            signatures.record(self.root, directory, shas[WEIGHTS_FILE])  # Arrow prototypes of a LoRA; checks A, B
            with self.index.write(checkpoint=False) as index:  # before the blobs appear: gc knows them for ours
                index.claim(shas.values())
            files = {f: self.blobs.put(directory / f, link=ours, sha=shas[f]) for f in MODULE_FILES}
            draft = Card(
                name=name, version=1, kinds=sorted({c["kind"] for cs in info["modules"].values() for c in cs}),
                modules=info["modules"], heads=info.get("heads") or {}, base_model=info["base_model"], task=task,
                tags=tags, metrics=metrics, trainable_parameters=counted,
                files={f: {"sha256": sha, "size": size} for f, (sha, size) in files.items()},
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"), pelthub_version=__version__,
                parents=resolved, description=description, source=None if source is None else dict(source),
                privacy=info.get("privacy"))
            with self.index.write() as index:
                existing = index.by_identity(draft.identity())
                if existing:
                    return existing
                self._check_parents_present(index, draft.parents, local)
                for f, (sha, _) in files.items():
                    if not self.blobs.exists(sha):  # a gc ran since put(); we hold the lock now, so write again
                        self.blobs.put(directory / f)
                card = dataclasses.replace(draft, version=index.allocate_version(name))
                index.insert(card)
        return card.ref

    def _module_dir(self, module: Any, tmp: Path, parents: list[dict[str, Any]] | None) -> Path:
        if isinstance(module, ModularModel):
            module.save_pretrained(str(tmp), **({"parents": parents} if parents else {}))
            return tmp
        if isinstance(module, (str, os.PathLike)):
            path = Path(module)
            if not path.is_dir():
                raise ModuleFormatError(f"{path} is not a directory; pass a ModularModel or a directory written by "
                                        "model.save_pretrained(dir)")
            return path
        raise ConfigError(f"add() takes a ModularModel or the path of a saved module, got {type(module).__name__}")

    def _parents(self, parents: Iterable[str | Mapping[str, Any]]) -> tuple[list[dict[str, Any]], set[str]]:
        """Pin each parent: a local ref becomes "name@version" with that card's digest; also the local refs."""
        out: dict[str, dict[str, Any]] = {}
        local_refs: set[str] = set()
        for item in parents:
            entry = {"ref": item, "sha256": None} if isinstance(item, str) else {"sha256": None, **dict(item)}
            if not isinstance(entry.get("ref"), str) or not entry["ref"]:
                raise ConfigError(f"parents: each parent is a ref or {{'ref': ..., 'sha256': ...}}, got {item!r}")
            try:
                local = self.get(entry["ref"])
            except RegistryError:  # not a local ref (e.g. a Hub repo id): keep as given
                local = None
            if local is not None:
                if entry["sha256"] not in (None, local.digest):
                    raise RegistryError(f"parent {entry['ref']!r} has sha256 {entry['sha256'][:16]}... but the "
                                        f"registry's {local.ref} is {local.digest[:16]}...; pass the right ref")
                entry = {"ref": local.ref, "sha256": local.digest}
                local_refs.add(local.ref)
            out.setdefault(entry["ref"], {"ref": entry["ref"], "sha256": entry["sha256"]})
        result = list(out.values())
        problem = FIELDS["parents"](result)
        if problem:
            raise ConfigError(f"parents must be {problem}, got {result!r}")
        return result, local_refs

    def _check_parents_present(self, index: Index, parents: list[dict[str, Any]], local: set[str]) -> None:
        """Inside the add's transaction: each local parent is still here, with the same content."""
        for parent in parents:
            if parent["ref"] not in local:
                continue
            row = index.get(*parse_ref(parent["ref"]))
            if row is None or self._card(row).digest != parent["sha256"]:
                raise RegistryError(f"parent {parent['ref']} was removed (or replaced) while this module was being "
                                    "added; nothing was added. Add the parent again, or leave it out of parents=")

    # ----- reading -----
    def get(self, ref: str) -> Card:
        """The card of `ref` ("name@version", or "name" for the latest)."""
        name, version = parse_ref(ref)
        row = self.index.get(name, version)
        if row is None:
            raise NotFoundError(self._not_found(name, version))
        return self._card(row)

    def path(self, ref: str) -> Path:
        """A verified, read-only local directory holding the module's files (pelthub.json, modules.safetensors)."""
        card = self.get(ref)
        files = {n: f["sha256"] for n, f in card.files.items()}
        return self.blobs.checkout(card.digest, files, card.ref)  # keyed by content: gc keeps live digests

    def load(self, ref: str, base: nn.Module, heads: bool | str = True) -> ModularModel:
        """Attach the module to `base` (a model or a ModularModel).

        Raises IncompatibleModuleError naming both architectures if `base`'s
        fingerprint differs from the one the module was trained on; warns if
        only the model name differs. `heads=False` leaves a saved task head out;
        `heads="as_saved"` takes one of another label count at its own size.
        """
        card = self.get(ref)
        check_compatible(card.base_model, base.base if isinstance(base, ModularModel) else base, f"module {card.ref}")
        return from_pretrained(base, self.path(card.ref), strict_base=False, heads=heads)

    def versions(self, name: str) -> list[Card]:
        """Every version of `name`, oldest first."""
        rows = self.index.versions(check_name(name))
        if not rows:
            raise NotFoundError(self._not_found(name, None))
        return [self._card(r) for r in rows]

    def search(self, kind: str | None = None, base_model: nn.Module | str | None = None, task: str | None = None,
               tags: Iterable[str] | str | None = None, text: str | None = None, compatible_only: bool = False,
               limit: int | None = None, examples: Iterable[str] | None = None, tokenizer: Any = None,
               top: int | None = None) -> list[Card] | Any:
        """Cards matching every filter given, compatible first.

        `base_model` is a model (its fingerprint and name are used), a
        fingerprint sha256, or a base-model name. Cards with the same
        fingerprint come first, then those trained on a model of the same name
        but another architecture (left out with `compatible_only=True`).
        `tags` must all be present; `text` is a case-insensitive substring of
        the name, description, task, tags, kinds, base name or metric names.
        With `examples` (texts; with `tokenizer` and the base model itself) it instead ranks the LoRAs trained
        on that base by Arrow routing, without training, and returns a `Ranking` (see `signatures.search`).
        """
        if examples is not None:
            return signatures.search(self, list(examples), tokenizer, base_model, top)
        sha, base_name = _base_keys(base_model)
        tags = [tags] if isinstance(tags, str) else list(tags or ())
        rows = self.index.search(kind, sha, base_name, task, tags, text, compatible_only, limit)
        return self._readable(rows)

    def _readable(self, rows: Iterable[tuple[int, str, int, str]]) -> list[Card]:
        """Cards of `rows`; a damaged row is reported (warning) and skipped, so one bad row hides only itself."""
        cards = []
        for row in rows:
            try:
                cards.append(self._card(row))
            except ModuleFormatError as e:
                warnings.warn(f"skipping a damaged card: {e}; `pelthub verify` lists damaged cards, "
                              f"`pelthub rm {row[1]}@{row[2]} --force` removes one", stacklevel=3)
        return cards

    def graph(self) -> nx.DiGraph:
        """Dependency graph of composed modules: an edge parent -> child for each parent a card lists.

        Nodes are refs with attribute `card` (None, with `missing=True`, for a
        parent that is not in this registry). `nx.ancestors(g, ref)` is what
        a module was built from; `nx.descendants(g, ref)` what was built from it.
        """
        graph = nx.DiGraph()
        cards = self._readable(self.index.all())
        for card in cards:
            graph.add_node(card.ref, card=card, missing=False)
        for card in cards:
            for parent in card.parents:
                if parent["ref"] not in graph:
                    graph.add_node(parent["ref"], card=None, missing=True)
                graph.add_edge(parent["ref"], card.ref, sha256=parent["sha256"])
        return graph

    # ----- maintenance -----
    def remove(self, ref: str, force: bool = False) -> list[str]:
        """Remove one version ("name@version") or every version ("name"); returns the refs removed.

        Refused while another module lists one of them as a parent, unless
        `force`. Blobs stay until `gc()`.
        """
        name, version = parse_ref(ref)
        with self.index.write() as index:
            rows = index.versions(name) if version is None else [r for r in [index.get(name, version)] if r]
            if not rows:
                raise NotFoundError(self._not_found(name, version))
            refs, ids = [f"{r[1]}@{r[2]}" for r in rows], [r[0] for r in rows]
            dependants = index.dependants(refs, ids)
            if dependants and not force:
                raise RegistryError(f"cannot remove {', '.join(refs)}: {', '.join(dependants)} "
                                    f"{'was' if len(dependants) == 1 else 'were'} built from it; remove "
                                    "those first, or pass force=True (`pelthub rm --force`); they keep "
                                    "working but list a parent that is gone")
            index.delete(ids)
        return refs

    def verify(self) -> VerifyReport:
        """Re-hash every blob, check every card parses and has its blobs, and that the index accounts for
        every blob (one it never recorded means the index lost commits: copied without `index.sqlite-wal`,
        or restored from an older backup)."""
        corrupt, on_disk = [], set()
        for sha in self.blobs:
            on_disk.add(sha)
            if file_sha256(self.blobs.path(sha)) != sha:
                corrupt.append(str(self.blobs.path(sha)))
        missing, bad, referenced = [], [], set()
        for row in self.index.all():
            try:
                card = self._card(row)
            except ModuleFormatError as e:
                bad.append(str(e))
                continue
            for fname, f in card.files.items():
                referenced.add(f["sha256"])
                if f["sha256"] not in on_disk and not self.blobs.exists(f["sha256"]):  # may be newer than listing
                    missing.append(f"{card.ref}: {fname} ({self.blobs.path(f['sha256'])})")
        known = self.index.accounted()
        unaccounted = [str(self.blobs.path(sha)) for sha in sorted(on_disk - known) if self.blobs.exists(sha)]
        return VerifyReport(len(on_disk), corrupt, missing, bad, len(on_disk - referenced), unaccounted,
                            self.blobs.strays())

    def gc(self, unaccounted: bool = False) -> GcReport:
        """Drop blobs and checkouts no card references, and temporary files of dead processes.

        Deletes only what the index accounts for: if a blob on disk is one the index never recorded,
        the index has lost commits (a folder copied without `index.sqlite-wal`, an older backup) and
        its cards may be the ones missing, so gc deletes nothing and raises RegistryError.
        `unaccounted=True` (`pelthub gc --unaccounted`) deletes those blobs too, once you know the index is
        the one you mean to keep. Runs under the index's write lock, so no add can commit meanwhile;
        an add whose blobs were dropped before it committed writes them again.
        """
        with self.index.write() as index:
            keep, known, on_disk = index.referenced_blobs(), index.accounted(), list(self.blobs)
            unknown = [sha for sha in on_disk if sha not in known]
            if unknown and not unaccounted:
                raise RegistryError(
                    f"gc deleted nothing: {len(unknown)} of the {len(on_disk)} blobs under {self.blobs.dir} are not "
                    f"in {self.index.path} (e.g. {unknown[0][:16]}...), so the index has lost commits: copied "
                    "without index.sqlite-wal, or restored from an older backup. Restore index.sqlite with its "
                    "-wal from where it came; if this index is the one to keep, `pelthub gc --unaccounted` "
                    "(gc(unaccounted=True)) deletes those blobs")
            dropped = [sha for sha in on_disk if sha not in keep]
            freed = sum(self.blobs.remove(sha) for sha in dropped)
            index.forget(dropped)
            checkouts = self.blobs.clean_checkouts(index.digests())
        return GcReport(len(dropped), freed, self.blobs.clean_temps(), checkouts)

    # ----- helpers -----
    def _card(self, row: tuple[int, str, int, str]) -> Card:
        where = f"card {row[1]}@{row[2]} in {self.index.path}"
        return Card.from_dict(jsonsafe.loads(row[3], where, ModuleFormatError), where=where)

    def _not_found(self, name: str, version: int | None) -> str:
        versions = [r[2] for r in self.index.versions(name)]
        if versions:
            return (f"{name}@{version} is not in the registry at {self.root}; versions of {name!r}: "
                    f"{', '.join(map(str, versions))}")
        close = difflib.get_close_matches(name, self.index.names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `pelthub list` shows what is there"
        return f"no module named {name!r} in the registry at {self.root}{hint}"


def require_registry(registry: Registry | None, what: str) -> Registry:
    """`registry`, or a ConfigError: library functions never open the default registry on their own.

    The default location ($PELTHUB_HOME, else ~/.cache/pelthub) is chosen only at the edges:
    `pelthub.Registry()` and the CLI's --registry.
    """
    if registry is None:
        raise ConfigError(f"{what} needs a registry to resolve it: pass registry=, e.g. registry=ph.Registry() "
                          "(the local one at $PELTHUB_HOME or ~/.cache/pelthub) or ph.Registry(path)")
    return registry


def parent_entries(registry: Registry | None, refs: Iterable[str]) -> list[dict[str, Any]]:
    """{"ref", "sha256"} of each ref the registry knows (a parent list); names it does not know are skipped."""
    out = []
    for ref in dict.fromkeys(refs) if registry is not None else ():
        try:
            card = registry.get(ref)
        except RegistryError:  # a label such as "source0", not a ref
            continue
        out.append({"ref": card.ref, "sha256": card.digest})
    return out


def _base_keys(base_model: nn.Module | str | None) -> tuple[str | None, str | None]:
    """(fingerprint sha256, base name) to search by."""
    if base_model is None:
        return None, None
    if isinstance(base_model, str):
        return (base_model, None) if SHA_RE.match(base_model) else (None, base_model)
    if isinstance(base_model, nn.Module):
        info = base_model_info(base_model.base if isinstance(base_model, ModularModel) else base_model)
        return info["fingerprint"]["sha256"], info["name"] or None
    raise ConfigError(f"search(base_model=) takes a model, a fingerprint sha256 or a model name, "
                      f"got {type(base_model).__name__}")


def _trainable_parameters(info: dict[str, Any], weights: Path) -> int:
    """The trainable parameter count pelthub.json declares (frozen tensors, such as ATTEMPT's source
    prompts, are saved but not trained), checked against the file; reading the file also rejects a
    damaged, foreign or non-float file early."""
    header = read_header(weights)
    check_finite(weights)
    stored = sum(math.prod(shape) for shape, _ in header.values())
    declared = info.get("trainable_parameters", stored)
    if not isinstance(declared, int) or isinstance(declared, bool) or not 0 <= declared <= stored:
        raise ModuleFormatError(f"{weights.parent / CONFIG_FILE}: trainable_parameters must be an integer between 0 "
                                f"and the {stored:,} parameters the weights file holds, got {declared!r}")
    return declared
