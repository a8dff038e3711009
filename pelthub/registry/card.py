"""Module cards: the registry's record of one module version, as data and as a README.md.

The index stores a card as JSON; the hub layer publishes the same card as a
Hugging Face model card (README.md with YAML front matter). Both directions
validate every field, so a damaged or hand-edited card fails on read with the
field named, instead of later as a KeyError deep inside a load.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from ..errors import ModuleFormatError, RegistryError

LIBRARY = "pelthub"
MAX_NAME = 100
# Anchored with \Z, not $: "$" also matches before a trailing newline, so "name\n" would pass.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")
VERSION_RE = re.compile(r"^[1-9][0-9]{0,17}\Z")
SHA_RE = re.compile(r"^[0-9a-f]{64}\Z")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?\Z", re.ASCII)
# C0/C1 control characters (terminal escapes, NUL) and lone surrogates (not encodable as UTF-8).
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROL_IN_TEXT_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # tabs and newlines allowed
# Fields that record when and by what a card was written, not what it describes.
BOOKKEEPING = ("version", "created", "pelthub_version")
MAX_YAML_NODES = 100_000  # nodes of a card's front matter; pelthub writes a few hundred
MAX_YAML_DEPTH = 64       # nesting of a card's front matter; pelthub writes under ten levels


class _FrontMatterLoader(yaml.SafeLoader):
    """safe_load without aliases, with a node budget and a depth limit.

    An alias (*name) repeats a node without repeating its text, so a 2 KB
    card of nested aliases expands into gigabytes; pelthub never writes one
    (`to_markdown` dumps plain data). Without aliases the nodes are bounded by
    the text, and the budget bounds them again for the slow pure-Python path;
    the depth limit stops a card of 100,000 '[' before the composer's
    recursion spends seconds on it.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self.nodes = self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a card",
                                              self.peek_event().start_mark)
        self.nodes, self.depth = self.nodes + 1, self.depth + 1
        if self.nodes > MAX_YAML_NODES or self.depth > MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_NODES:,} nodes or "
                                              f"{MAX_YAML_DEPTH} levels", self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def check_name(name: Any, what: str = "module name") -> str:
    """Return `name` if it is a safe registry name; names become refs and file names, so no paths."""
    if not isinstance(name, str) or not name:
        raise RegistryError(f"{what} must be a non-empty string, got {name!r}; e.g. 'sst2-prompt'")
    if len(name) > MAX_NAME:
        raise RegistryError(f"{what} {name[:24]!r}... is {len(name)} characters long; the limit is {MAX_NAME}")
    if ".." in name or not NAME_RE.match(name):
        raise RegistryError(f"{what} {name!r} is not allowed: use letters, digits, '.', '_' and '-', starting with "
                            "a letter or digit, with no '..', '/', '@' or spaces (e.g. 'sst2-prompt')")
    return name


def parse_ref(ref: Any) -> tuple[str, int | None]:
    """'name@3' -> ('name', 3); 'name' -> ('name', None), which means the latest version."""
    if not isinstance(ref, str):
        raise RegistryError(f"a module ref is a string 'name' or 'name@version', got {type(ref).__name__} {ref!r}")
    name, sep, version = ref.partition("@")
    if sep and not VERSION_RE.match(version):
        raise RegistryError(f"malformed ref {ref!r}: after '@' comes a positive version number, e.g. "
                            f"'{name or 'name'}@1'; leave it out for the latest version")
    check_name(name, what=f"module name in ref {ref!r}")
    return name, int(version) if sep else None


# ----- field checks: each returns a description of what was expected, or None when the value is fine -----
Check = Callable[[Any], "str | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _expect(ok: bool, description: str) -> str | None:
    return None if ok else description


def _plain(v: Any) -> bool:
    """A one-line string: no control characters, no lone surrogates."""
    return isinstance(v, str) and not _CONTROL_RE.search(v)


def _str_list(v: Any) -> str | None:
    return _expect(isinstance(v, list) and all(_plain(x) and x for x in v),
                   "a list of non-empty strings without control characters")


def _metrics(v: Any) -> str | None:
    return _expect(isinstance(v, dict) and all(
        _plain(k) and k and (_is_int(x) or isinstance(x, float) and math.isfinite(x)) for k, x in v.items()),
        "a mapping of metric names to finite numbers")


def _modules(v: Any) -> str | None:
    return _expect(isinstance(v, dict) and all(isinstance(k, str) and isinstance(cs, list) and cs and all(
        isinstance(c, dict) and isinstance(c.get("kind"), str) for c in cs) for k, cs in v.items()),
        "a mapping of module-set names to non-empty lists of configs, each with a 'kind'")


def _heads(v: Any) -> str | None:
    return _expect(isinstance(v, dict) and all(isinstance(k, str) and _str_list(h) is None for k, h in v.items()),
                   "a mapping of module-set names to lists of head names")


def _files(v: Any) -> str | None:
    return _expect(isinstance(v, dict) and v and all(
        isinstance(k, str) and NAME_RE.match(k) and ".." not in k and isinstance(f, dict)
        and isinstance(f.get("sha256"), str) and SHA_RE.match(f["sha256"]) and _is_int(f.get("size"))
        and f["size"] >= 0 for k, f in v.items()),
        "a non-empty mapping of plain file names to {'sha256': <64 hex>, 'size': <bytes>}")


def _parents(v: Any) -> str | None:
    return _expect(isinstance(v, list) and all(
        isinstance(p, dict) and isinstance(p.get("ref"), str) and p["ref"]
        and (p.get("sha256") is None or isinstance(p["sha256"], str) and SHA_RE.match(p["sha256"])) for p in v),
        "a list of {'ref': 'name@version', 'sha256': <64 hex or null>}")


def _base_model(v: Any) -> str | None:
    fp = v.get("fingerprint") if isinstance(v, dict) else None
    return _expect(isinstance(v, dict) and isinstance(v.get("name"), str)
                   and (v.get("revision") is None or isinstance(v["revision"], str))
                   and isinstance(fp, dict) and isinstance(fp.get("sha256"), str) and bool(SHA_RE.match(fp["sha256"])),
                   "{'name': str, 'revision': str or null, 'fingerprint': {'sha256': <64 hex>, ...}}")


def _privacy(v: Any) -> str | None:
    eps, delta = (v.get("epsilon"), v.get("delta")) if isinstance(v, dict) else (None, None)
    return _expect(v is None or isinstance(v, dict) and all(
        _plain(k) and (_plain(x) or _is_int(x) or isinstance(x, float) and math.isfinite(x)) for k, x in v.items())
        and isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0
        and isinstance(delta, float) and 0 < delta < 1,
        "null, or a mapping with a finite 'epsilon' >= 0 and a 'delta' in (0, 1), plus numbers or strings saying "
        "how they were accounted (pelthub.privacy.fit_private writes it)")


def _name(v: Any) -> str | None:
    try:
        check_name(v)
    except RegistryError as e:
        return f"a valid module name ({e})"
    return None


FIELDS: dict[str, Check] = {
    "name": _name,
    "version": lambda v: _expect(_is_int(v) and v >= 1, "a positive integer"),
    "kinds": lambda v: _str_list(v) or _expect(bool(v), "a non-empty list of module kinds"),
    "modules": _modules,
    "heads": _heads,
    "base_model": _base_model,
    "task": lambda v: _expect(v is None or _plain(v) and bool(v), "a non-empty string without control characters, "
                                                                  "or null"),
    "tags": _str_list,
    "metrics": _metrics,
    "trainable_parameters": lambda v: _expect(_is_int(v) and v >= 0, "a non-negative integer"),
    "files": _files,
    "created": lambda v: _expect(isinstance(v, str) and bool(v), "an ISO 8601 time string"),
    "pelthub_version": lambda v: _expect(isinstance(v, str) and bool(v), "a version string"),
    "parents": _parents,
    "description": lambda v: _expect(isinstance(v, str) and not _CONTROL_IN_TEXT_RE.search(v),
                                     "a string without control characters (tabs and newlines are fine)"),
    "source": lambda v: _expect(v is None or isinstance(v, dict), "a mapping (e.g. {'repo_id': ..., 'commit': ...}) "
                                                                  "or null"),
    "privacy": _privacy,
}
OPTIONAL = {"description": "", "source": None, "privacy": None}
# Fields added after cards were first stored: left out of `identity()` while unset, so the cards stored
# before keep their identity (adding the same module again still finds them).
LATER = ("privacy",)


@dataclass(frozen=True)
class Card:
    """One registered module version: what it is, what it was trained on, and its files' sha256.

    `source` records where a module came from when it was pulled (e.g.
    {"repo_id": ..., "commit": ...}); `parents` lists the modules a composed
    module was built from, as {"ref": "name@version", "sha256": <their digest>}. `privacy` is the
    (ε, δ) of the DP training that produced the module and how it was accounted (`pelthub.privacy`).
    """

    name: str
    version: int
    kinds: list[str]
    modules: dict[str, list[dict[str, Any]]]
    heads: dict[str, list[str]]
    base_model: dict[str, Any]
    task: str | None
    tags: list[str]
    metrics: dict[str, float]
    trainable_parameters: int
    files: dict[str, dict[str, Any]]
    created: str
    pelthub_version: str
    parents: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""
    source: dict[str, Any] | None = None
    privacy: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        validate({name: getattr(self, name) for name in FIELDS}, f"card {self.name!r}")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def base_sha(self) -> str:
        """The architecture fingerprint of the base model this module was trained on."""
        return self.base_model["fingerprint"]["sha256"]

    @property
    def digest(self) -> str:
        """Content id: sha256 over the file names and their sha256; equal digests mean equal files."""
        manifest = {name: f["sha256"] for name, f in self.files.items()}
        return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()

    def identity(self) -> str:
        """sha256 of everything the card says about the module (bookkeeping left out): equal means same entry."""
        body = {k: v for k, v in self.to_dict().items()
                if k not in BOOKKEEPING and not (k in LATER and v == OPTIONAL[k])}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "card") -> "Card":
        """Rebuild a card; a missing or wrong-typed field raises ModuleFormatError naming it."""
        validate(data, where)
        card = object.__new__(cls)  # validated just now: skip __post_init__'s second pass (search parses many)
        for name in FIELDS:
            object.__setattr__(card, name, data.get(name, OPTIONAL.get(name)))
        return card

    def hub_tags(self) -> list[str]:
        """Tags for the Hub: the library, each kind, the task, the user's tags, the base-model relation."""
        tags = [LIBRARY, *self.kinds, *([self.task] if self.task else []), *self.tags]
        if self.hub_base_model():
            tags.append(f"base_model:adapter:{self.hub_base_model()}")
        return list(dict.fromkeys(tags))

    def hub_base_model(self) -> str | None:
        """The base model name if it reads as a Hub repo id (local paths and empty names do not)."""
        name = self.base_model["name"]
        return name if HUB_ID_RE.match(name) and ".." not in name else None

    def to_markdown(self) -> str:
        """README.md text: Hub front matter (library_name, base_model, tags, metrics) plus a readable body.

        The whole card rides along under the `pelthub` key, so `from_markdown` gives it back unchanged.
        """
        meta: dict[str, Any] = {"library_name": LIBRARY}
        if self.hub_base_model():
            meta["base_model"] = self.hub_base_model()
        meta["tags"] = self.hub_tags()
        if self.metrics:
            meta["metrics"] = sorted(self.metrics)
        meta[LIBRARY] = self.to_dict()
        front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
        return f"---\n{front}---\n\n{self._body()}"

    @classmethod
    def from_markdown(cls, text: str, where: str = "README.md") -> "Card":
        if not text.startswith("---\n") or "\n---\n" not in text[3:]:
            raise ModuleFormatError(f"{where} has no YAML front matter between '---' lines; "
                                    "write it with Card.to_markdown()")
        front = text[4:text.index("\n---\n", 3) + 1]
        try:
            loader = _FrontMatterLoader(front)
            try:
                meta = loader.get_single_data()
            finally:
                loader.dispose()
        except (yaml.YAMLError, RecursionError) as e:
            problem = " ".join(str(e).split())
            problem = problem if len(problem) <= 200 else problem[:197] + "..."
            raise ModuleFormatError(f"{where}: front matter is not valid YAML for a card: {problem}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get(LIBRARY), dict):
            raise ModuleFormatError(f"{where}: front matter field {LIBRARY!r} (the pelthub card) is missing or "
                                    "not a mapping; this README was not written by pelthub")
        return cls.from_dict(meta[LIBRARY], where=f"{where} field {LIBRARY!r}")

    def _body(self) -> str:
        fp = self.base_model["fingerprint"]
        base = self.base_model["name"] or "an unnamed model"
        rows = [("kinds", ", ".join(self.kinds)), ("task", self.task or "-"),
                ("base model", f"{base} ({fp.get('model_type')}, hidden {fp.get('hidden')}, "
                               f"{fp.get('layers')} layers)"),
                ("fingerprint", f"`{fp['sha256'][:16]}`"), ("revision", self.base_model.get("revision") or "-"),
                ("trainable parameters", f"{self.trainable_parameters:,}"),
                ("metrics", ", ".join(f"{k} = {v:g}" for k, v in sorted(self.metrics.items())) or "-"),
                ("tags", ", ".join(self.tags) or "-"),
                ("parents", ", ".join(p["ref"] for p in self.parents) or "-"),
                ("privacy", f"(ε = {self.privacy['epsilon']:.3g}, δ = {self.privacy['delta']:.3g})-DP"
                            if self.privacy else "-"),
                ("created", self.created), ("pelthub", self.pelthub_version)]
        table = "\n".join(f"| {k} | {v} |" for k, v in rows)
        intro = f"{self.description}\n\n" if self.description else ""
        return (f"# {self.ref}\n\n{intro}A pelthub module ({', '.join(self.kinds)}) for "
                f"{'task ' + repr(self.task) if self.task else 'no named task'}.\n\n| field | value |\n|---|---|\n"
                f"{table}\n\n## Use\n\n```python\nimport pelthub as ph\n\n"
                f"model = ph.Registry().load({self.ref!r}, base)   # base: the model named above\n"
                "# or, from this folder: model = ph.from_pretrained(base, path)\n```\n")


def validate(data: Any, where: str) -> None:
    """Raise ModuleFormatError naming the first missing or wrong-typed field."""
    if not isinstance(data, dict):
        raise ModuleFormatError(f"{where} must be a mapping of fields, got {type(data).__name__}")
    for name, check in FIELDS.items():
        if name not in data:
            if name in OPTIONAL:
                continue
            raise ModuleFormatError(f"{where}: field {name!r} is missing")
        problem = check(data[name])
        if problem:
            raise ModuleFormatError(f"{where}: field {name!r} must be {problem}, got "
                                    f"{type(data[name]).__name__} {_short(data[name])}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
