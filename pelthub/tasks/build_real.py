"""Build the real-text task files in ``pelthub/tasks/real_data/`` from sources Debian installs offline.

    apt-get update && apt-get install -y wordnet-base
    python -m pelthub.tasks.build_real [--out DIR]

Three sources, each labelled by a category its authors assigned, not by us:

* WordNet 3.0 glosses (``/usr/share/wordnet/data.*``), labelled by lexicographer file;
* Debian package short descriptions (``apt-cache dumpavail``), labelled by archive Section and debtags;
* code: functions with docstrings in the Python stdlib and the running environment's packages
  (parsed with ``ast``, never imported), labelled by module family.

Tasks come in families whose labels mean the same across sources (biology vs technology in glosses
and in package descriptions), so transfer between siblings has something real to find; a few tasks
stand apart. The output is a pure function of the sources: items are ordered and split by sha256 of
their text, gzip carries no timestamp, and nothing about the build time is recorded, so two runs
over the same sources give identical bytes. Each file's header records what was read (Debian
release, apt policy, WordNet version, Python and package versions) and the licence terms.
"""
from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pelthub.errors import DataError

WORDNET_DIR = Path("/usr/share/wordnet")
DEBIAN_VERSION = Path("/etc/debian_version")
APT_CACHE = "apt-cache"
OUT_DIR = Path(__file__).with_name("real_data")
FORMAT = 1  # bump when the file layout or the cleaning rules change
CAP = 1500  # examples kept per label: a few thousand per task keeps the committed files small
SPLIT_RULE = "sha256('split:' + text) mod 10: 0-5 train, 6-7 dev, 8-9 test"

# Lexicographer file numbers of WordNet 3.0 (lexnames(5WN)); data files give only the number.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
    "adj.ppl").split()

# Module family -> modules whose functions carry it (stdlib first, then packages, when installed).
CODE_FAMILIES = {
    "numbers": ("statistics", "fractions", "_pydecimal", "random", "numbers", "numpy", "mpmath"),
    "text": ("string", "textwrap", "re", "difflib", "html", "_markupbase", "xml", "stringprep", "tokenize", "shlex",
             "gettext", "regex", "jinja2", "markupsafe", "markdown_it", "pygments", "pyparsing"),
    "network": ("http", "urllib", "socket", "ssl", "ftplib", "smtplib", "imaplib", "poplib", "nntplib", "telnetlib",
                "smtpd", "asynchat", "asyncore", "email", "ipaddress", "socketserver", "wsgiref", "xmlrpc", "h11",
                "httpcore2", "httpx2", "idna"),
    "files": ("os", "shutil", "pathlib", "glob", "fnmatch", "tarfile", "zipfile", "tempfile", "filecmp",
              "fileinput", "_pyio", "gzip", "bz2", "lzma", "shelve", "dbm", "posixpath", "ntpath", "genericpath",
              "fsspec", "filelock"),
    "concurrency": ("threading", "multiprocessing", "asyncio", "concurrent", "queue", "sched", "anyio",
                    "joblib"),
}

LENGTH = {"wordnet": (20, 300), "debian": (15, 200), "code": (40, 600)}  # characters kept, per source


@dataclass(frozen=True)
class Item:
    """One text from a source with the categories its source gave it."""

    text: str
    origin: str  # where it came from: synset id, package name or module.function
    cats: frozenset[str]


@dataclass(frozen=True)
class Spec:
    """One task: which source, and which source categories make each label.

    An item is kept only when exactly one label's categories match it, and dropped when its text
    contains a leak stem (every label name is one) at the start of a word, so the label word itself
    is never the cue.
    """

    name: str
    family: str
    source: str
    labels: tuple[tuple[str, tuple[str, ...]], ...]
    leaks: tuple[str, ...] = ()


_BIO_WN, _TECH_WN = ("noun.animal", "noun.plant"), ("noun.artifact",)
_BIO_DEB = ("field::biology", "works-with::biological-sequence")
_TECH_DEB = ("section::devel", "section::admin")
_NUM_DEB = ("section::math", "field::mathematics", "field::statistics")
_TEXT_DEB = ("section::text", "works-with::text")

SPECS = (
    Spec("wn_bio_tech", "bio_tech", "wordnet", (("biology", _BIO_WN), ("technology", _TECH_WN)),
         ("animal", "plant", "artifact")),
    Spec("deb_bio_tech", "bio_tech", "debian", (("biology", _BIO_DEB), ("technology", _TECH_DEB)),
         ("biolog", "devel", "admin")),
    Spec("wn_num_text", "num_text", "wordnet",
         (("numbers", ("noun.quantity",)), ("text", ("noun.communication",))), ("number", "quantit", "communicat")),
    Spec("deb_num_text", "num_text", "debian", (("numbers", _NUM_DEB), ("text", _TEXT_DEB)),
         ("number", "math", "statistic")),
    Spec("code_num_text", "num_text", "code", (("numbers", ("numbers",)), ("text", ("text",)))),
    Spec("wn_topics", "topics", "wordnet",
         (("biology", _BIO_WN), ("numbers", ("noun.quantity",)), ("text", ("noun.communication",)),
          ("technology", _TECH_WN)), ("animal", "plant", "artifact", "number", "quantit", "communicat")),
    Spec("deb_topics", "topics", "debian",
         (("biology", _BIO_DEB), ("numbers", _NUM_DEB), ("text", _TEXT_DEB), ("technology", _TECH_DEB)),
         ("biolog", "devel", "admin", "number", "math", "statistic")),
    Spec("wn_people_places", "wn_people_places", "wordnet",
         (("people", ("noun.person",)), ("places", ("noun.location",))), ("person", "location")),
    Spec("wn_verbs", "wn_verbs", "wordnet",
         (("motion", ("verb.motion",)), ("communication", ("verb.communication",)),
          ("creation", ("verb.creation",)), ("consumption", ("verb.consumption",))),
         ("move", "communicat", "creat", "consum")),
    Spec("deb_sections", "deb_sections", "debian",
         (("games", ("section::games",)), ("sound", ("section::sound",)), ("graphics", ("section::graphics",)),
          ("mail", ("section::mail",))), ("game", "graphic")),
    Spec("code_modules", "code_modules", "code",
         (("network", ("network",)), ("files", ("files",)), ("concurrency", ("concurrency",))),
         ("file", "concurren")),
)

WORDNET_NOTE = ("Glosses from WordNet 3.0 (Princeton University), read from the Debian package wordnet-base; "
                "redistributed under the WordNet 3.0 licence below, which must accompany this file.")
DEBIAN_NOTE = ("Short package descriptions, Section and debtags from the Debian archive's main component "
               "(apt-cache dumpavail). Each description is part of its package's metadata and is covered by "
               "that package's licence, which Debian main requires to be DFSG-free (redistribution allowed); "
               "each row's 'origin' names the package, whose terms are in /usr/share/doc/<package>/copyright "
               "or at https://packages.debian.org/<package>. The debtags are by the Debian debtags project.")
CODE_NOTE = ("Excerpts of functions (signature, first docstring paragraph, first lines of the body) from the "
             "Python standard library (PSF-2.0) and the packages listed under provenance.packages, each under "
             "the licence recorded there; each row's 'origin' names the module and function.")


def _clean(text: str) -> str:
    return " ".join(text.split())


def _run(args: list[str], install_hint: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.CalledProcessError) as e:
        raise DataError(f"`{' '.join(args)}` failed ({e}); {install_hint}") from None
    return done.stdout


# ---------------------------------------------------------------- WordNet
def read_wordnet() -> tuple[list[Item], dict[str, str]]:
    """Every synset's gloss (examples dropped) with its lexicographer file, and what was read."""
    paths = [WORDNET_DIR / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"WordNet data not found ({', '.join(missing)}); install it with "
                        "`apt-get install wordnet-base` (Debian/Ubuntu) to rebuild the real-text tasks")
    items = []
    version = re.search(r"WordNet (\d+\.\d+) Copyright", paths[0].read_text(encoding="latin-1"))
    for path in paths:
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):  # the licence header
                continue
            fields, _, gloss = line.partition(" | ")
            offset, lexfile, pos = fields.split(" ", 3)[:3]
            definition = gloss.split('; "')[0].strip()  # examples follow the definition in quotes
            items.append(Item(_clean(definition), f"{pos}{offset}", frozenset({LEXNAMES[int(lexfile)]})))
    policy = _run([APT_CACHE, "policy", "wordnet-base"], "is apt installed?").strip()
    return items, {"wordnet_version": version[1] if version else "unknown", "apt_policy_wordnet_base": policy,
                   "licence_text": _wordnet_licence()}


def _wordnet_licence() -> str:
    """The WordNet licence as Debian ships it (the copyright file's WordNet3.0 stanza)."""
    copyright = Path("/usr/share/doc/wordnet-base/copyright")
    if not copyright.is_file():
        raise DataError(f"{copyright} not found; install `wordnet-base` so its licence ships with the tasks")
    stanza = copyright.read_text().split("License: WordNet3.0\n", 1)[-1].split("\n\n", 1)[0]
    return "\n".join("" if line.strip() == "." else line[1:] for line in stanza.splitlines())


# ---------------------------------------------------------------- Debian
def _stanzas(text: str) -> Iterator[dict[str, str]]:
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            yield fields


def _debian_cats(fields: dict[str, str]) -> frozenset[str]:
    """section::<Section> and every debtag with its parents (field::biology:molecular -> field::biology)."""
    cats = {f"section::{fields.get('Section', '').rpartition('/')[2]}"}
    for tag in filter(None, (t.strip() for t in fields.get("Tag", "").split(","))):
        facet, _, value = tag.partition("::")
        parts = value.split(":")
        cats |= {f"{facet}::{':'.join(parts[:i])}" for i in range(1, len(parts) + 1)}
    return frozenset(cats)


def read_debian() -> tuple[list[Item], dict[str, str]]:
    """Every package's short description with its Section and debtags, and the archive it came from."""
    hint = "run `apt-get update` (as root) so apt-cache lists the Debian archive"
    dump = _run([APT_CACHE, "dumpavail"], hint)
    items = [Item(_clean(f.get("Description", "")), f["Package"], _debian_cats(f)) for f in _stanzas(dump)]
    if not items:
        raise DataError(f"`{APT_CACHE} dumpavail` listed no packages; {hint}")
    policy = _run([APT_CACHE, "policy"], hint)
    releases = sorted({line.strip() for line in policy.splitlines() if line.strip().startswith("release v=")})
    return items, {"apt_releases": "\n".join(releases)}


# ---------------------------------------------------------------- code
def _module_files(module: str) -> list[tuple[str, Path]]:
    """(dotted name, path) of every .py file of ``module`` in the stdlib or site-packages, tests skipped."""
    for root in (Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])):
        path = root.joinpath(*module.split("."))
        if path.is_dir():
            return [(".".join(p.relative_to(root).with_suffix("").parts), p) for p in sorted(path.rglob("*.py"))
                    if not {"test", "tests", "testing"} & set(p.relative_to(root).parts)]
        if path.with_suffix(".py").is_file():
            return [(module, path.with_suffix(".py"))]
    return []


def _excerpt(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """Signature, first docstring paragraph, then body lines: the function as a reader skims it."""
    doc = ast.get_docstring(node) or ""
    summary = _clean(doc.split("\n\n")[0])
    head = lines[node.lineno - 1:node.body[0].lineno - 1]
    body = lines[node.body[1].lineno - 1:node.end_lineno] if len(node.body) > 1 else []
    indent = " " * (node.body[0].col_offset)
    text = textwrap.dedent("\n".join(head + [f'{indent}"""{summary}"""'] + body))
    text = "\n".join(line.rstrip() for line in text.splitlines() if line.strip())
    return text if len(text) <= LENGTH["code"][1] else text[:text.rfind("\n", 0, LENGTH["code"][1])]


def read_code() -> tuple[list[Item], dict[str, str]]:
    """Functions with a docstring of each family's modules, and the versions and licences read."""
    items, packages = [], {}
    dists = importlib.metadata.packages_distributions()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for family, modules in CODE_FAMILIES.items():
        for module in modules:
            files = _module_files(module)
            if files and not files[0][1].is_relative_to(stdlib):
                dist = dists[module.split(".")[0]][0]
                meta = importlib.metadata.metadata(dist)
                licence = meta.get("License-Expression") or next(
                    (c.rpartition(" :: ")[2] for c in meta.get_all("Classifier") or [] if c.startswith("License")),
                    _clean(meta.get("License") or "unknown")[:80])
                packages[dist] = f"{importlib.metadata.version(dist)} ({licence})"
            for dotted, path in files:
                source = path.read_text(encoding="utf-8", errors="replace")
                try:
                    tree = ast.parse(source)
                except SyntaxError:  # a file for another Python version; nothing to read from it
                    continue
                lines = source.splitlines()
                items += [Item(_excerpt(lines, node), f"{dotted}.{node.name}", frozenset({family}))
                          for node in ast.walk(tree)
                          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node)]
    return items, {"python": sys.version.split()[0], "packages": json.dumps(dict(sorted(packages.items())))}


# ---------------------------------------------------------------- tasks
def _sha(prefix: str, text: str) -> str:
    return hashlib.sha256(f"{prefix}:{text}".encode()).hexdigest()


def split_of(text: str) -> str:
    """train / dev / test by a hash of the text alone, so a text's split never depends on the others."""
    bucket = int(_sha("split", text)[:8], 16) % 10
    return "train" if bucket < 6 else "dev" if bucket < 8 else "test"


def select(spec: Spec, items: Iterable[Item]) -> list[tuple[str, int, str]]:
    """(text, label, origin) rows of one task: cleaned, deduplicated, leak-free, CAP or fewer per label, balanced."""
    low, high = LENGTH[spec.source]
    leak = re.compile(r"\b(?:" + "|".join(map(re.escape, [n for n, _ in spec.labels] + list(spec.leaks))) + ")",
                      re.IGNORECASE)
    by_key: dict[str, set[tuple[str, int, str]]] = {}
    for item in items:
        labels = [i for i, (_, cats) in enumerate(spec.labels) if item.cats & set(cats)]
        if len(labels) == 1 and low <= len(item.text) <= high and not leak.search(item.text):
            by_key.setdefault(item.text.casefold(), set()).add((item.text, labels[0], item.origin))
    pools: list[list[tuple[str, int, str]]] = [[] for _ in spec.labels]
    for rows in by_key.values():
        if len({label for _, label, _ in rows}) == 1:  # a text under two labels teaches nothing
            pools[next(iter(rows))[1]].append(min(rows))
    keep = min(CAP, *map(len, pools))
    return [row for pool in pools for row in sorted(pool, key=lambda r: _sha("pick", r[0]))[:keep]]


def render(spec: Spec, rows: list[tuple[str, int, str]], provenance: dict[str, str]) -> bytes:
    """One gzip JSONL file: a header line, then one line per example sorted by split and text hash."""
    labelled = sorted(((split_of(text), _sha("order", text), text, label, origin) for text, label, origin in rows))
    counts = {s: [sum(1 for r in labelled if r[0] == s and r[3] == i) for i in range(len(spec.labels))]
              for s in ("train", "dev", "test")}
    prov = dict(provenance)
    licence = {"wordnet": WORDNET_NOTE, "debian": DEBIAN_NOTE, "code": CODE_NOTE}[spec.source]
    if "licence_text" in prov:
        licence += "\n\n" + prov.pop("licence_text")
    header = {"format": FORMAT, "task": spec.name, "family": spec.family, "source": spec.source,
              "label_names": [name for name, _ in spec.labels],
              "label_sources": {name: list(cats) for name, cats in spec.labels},
              "leak_stems": sorted({name for name, _ in spec.labels} | set(spec.leaks)),
              "length_chars": list(LENGTH[spec.source]), "cap_per_label": CAP, "split_rule": SPLIT_RULE,
              "counts": counts, "provenance": prov, "licence": licence}
    lines = [json.dumps({"header": header}, sort_keys=True, ensure_ascii=False)]
    lines += [json.dumps({"split": s, "label": label, "text": text, "origin": origin}, ensure_ascii=False)
              for s, _, text, label, origin in labelled]
    return gzip.compress(("\n".join(lines) + "\n").encode(), compresslevel=9, mtime=0)


READERS = {"wordnet": read_wordnet, "debian": read_debian, "code": read_code}


def build(out: Path = OUT_DIR, sources: Iterable[str] = tuple(READERS)) -> list[Path]:
    """Read every source first, then write the tasks of ``sources``; a missing source writes nothing."""
    wanted = list(sources)
    read = {name: READERS[name]() for name in wanted}
    debian = DEBIAN_VERSION.read_text().strip() if DEBIAN_VERSION.is_file() else "not Debian"
    files = {}
    for spec in SPECS:
        if spec.source in read:
            items, provenance = read[spec.source]
            rows = select(spec, items)
            files[out / f"{spec.name}.jsonl.gz"] = render(spec, rows, {"debian_version": debian, **provenance})
    if "wordnet" in read:
        files[out / "WORDNET_LICENSE"] = (WORDNET_NOTE + "\n\n" + read["wordnet"][1]["licence_text"] + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    for path, data in files.items():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return sorted(files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pelthub.tasks.build_real", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder for the task files (default: %(default)s)")
    parser.add_argument("--source", action="append", choices=sorted(READERS),
                        help="build only the tasks of this source (repeatable; default: all)")
    args = parser.parse_args(argv)
    try:
        paths = build(args.out, args.source or tuple(READERS))
    except DataError as e:
        sys.exit(f"error: {e}")
    for path in paths:
        print(f"{path} {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
