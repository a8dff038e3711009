"""Push registry modules to the Hugging Face Hub and pull them back, verified.

A pushed repo holds the module files (pelthub.json, modules.safetensors) and
a README.md whose front matter carries the whole card, so a pull restores
the card and checks every file against the sha256 it lists. One push is one
commit (`upload_folder`); a tag, if asked for, points at that commit.

Composed modules name the modules they were built from. Across the Hub a
parent is `{"ref", "sha256", "repo_id", "commit"}`: push refuses a module
whose parents are not on that Hub yet (it knows where they are from their
card's `source`, or from its own log of pushes, `<registry>/hub/pushes.jsonl`),
and pull fetches them first, pinned to those commits, so the dependency graph
arrives whole and each parent's content is checked against its sha256.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from huggingface_hub import constants

from ..errors import HubConnectionError, HubError, HubIntegrityError, ModuleFormatError
from ..registry.blobs import file_sha256
from ..registry.card import Card
from .client import COMMIT_RE, Snapshot, api, check_online, download, endpoint_of, resolve, translated

if TYPE_CHECKING:
    from ..registry import Registry

README = "README.md"
PUSH_LOG = Path("hub") / "pushes.jsonl"


# ----- the repo layout -----
def write_folder(registry: "Registry", card: Card, directory: Path, repo_id: str | None = None) -> Path:
    """Write a module as a Hub repo folder: its files plus README.md (the card, and how to load it)."""
    directory.mkdir(parents=True, exist_ok=True)
    source = registry.path(card.ref)
    for name in card.files:
        shutil.copyfile(source / name, directory / name)
    (directory / README).write_text(card.to_markdown() + (_hub_usage(card, repo_id) if repo_id else ""),
                                    encoding="utf-8")
    return directory


def _hub_usage(card: Card, repo_id: str) -> str:
    base = card.base_model["name"] or "the base model named above"
    return (f"\n## From the Hub\n\n```python\nimport pelthub as ph\nreg = ph.Registry()\n"
            f"model = reg.load(reg.pull({repo_id!r}), base)   # base: {base}\n```\n")


# ----- push -----
def push(registry: "Registry", ref: str, repo_id: str, revision: str | None = None, private: bool = False,
         token: str | None = None, endpoint: str | None = None, tag: str | None = None) -> str:
    """Upload module `ref` to `repo_id` (created if needed) in one commit; returns the commit sha.

    revision: the branch to commit to (created from the default branch if
    missing); tag: a tag to put on the new commit. Parents must be on the same
    Hub already (push them first).
    """
    card = registry.get(ref)
    url = endpoint_of(endpoint)
    what = f"push {card.ref} to {repo_id}"
    check_online(what)
    published = dataclasses.replace(card, parents=[_located(registry, card, p, url) for p in card.parents])
    hub = api(endpoint, token)
    with tempfile.TemporaryDirectory(dir=registry.blobs.tmp, prefix=f"{os.getpid()}-") as tmp:
        with translated(what, repo_id, revision, endpoint, token):
            repo_id = hub.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if tag and tag in {t.name for t in hub.list_repo_refs(repo_id).tags}:  # refuse before committing
                raise HubError(f"cannot {what}: {repo_id} already has a tag {tag!r}; pick another tag")
            folder = write_folder(registry, published, Path(tmp), repo_id)
            if revision and revision != "main":
                hub.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = hub.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                       commit_message=f"pelthub push {card.ref}").oid
            if tag:
                hub.create_tag(repo_id, tag=tag, revision=commit)
    _log_push(registry, {"digest": card.digest, "ref": card.ref, "repo_id": repo_id, "commit": commit,
                         "endpoint": url})
    return commit


def _located(registry: "Registry", card: Card, parent: dict[str, Any], url: str) -> dict[str, Any]:
    """A parent entry with the Hub repo and commit holding that parent's content."""
    sha = parent.get("sha256")
    where = next((s for s in _hub_copies(registry, sha) if s["endpoint"] == url), None) if sha else None
    if where is None:
        raise HubError(f"cannot push {card.ref}: it was built from {parent['ref']}, which is not on {url} yet; "
                       f"push the parents first, e.g. reg.push({parent['ref']!r}, '<user>/<repo>') "
                       f"(`pelthub push {parent['ref']} <user>/<repo>`)")
    return {"ref": parent["ref"], "sha256": sha, "repo_id": where["repo_id"], "commit": where["commit"]}


def _hub_copies(registry: "Registry", digest: str) -> Iterator[dict[str, Any]]:
    """Where content `digest` is on a Hub, newest first: pushes logged here, then pulled cards' sources."""
    yield from (e for e in reversed(_read_log(registry)) if e.get("digest") == digest)
    yield from (c.source for c in registry.search() if c.digest == digest and _is_hub_source(c.source))


def _log_push(registry: "Registry", entry: dict[str, Any]) -> None:
    """Append one line; O_APPEND makes concurrent appends from several processes safe."""
    path = registry.root / PUSH_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_log(registry: "Registry") -> list[dict[str, Any]]:
    path = registry.root / PUSH_LOG
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a torn last line from a crash: the others still count
            continue
        if isinstance(entry, dict) and _is_hub_source(entry):
            entries.append(entry)
    return entries


def _is_hub_source(source: Any) -> bool:
    return isinstance(source, dict) and all(isinstance(source.get(k), str) for k in ("repo_id", "commit", "endpoint"))


# ----- pull -----
def pull(registry: "Registry", repo_id: str, revision: str | None = None, endpoint: str | None = None,
         token: str | None = None, name: str | None = None, _seen: frozenset = frozenset()) -> str:
    """Download a pushed module (and, first, the modules it was built from) into `registry`; returns its ref.

    Every file is checked against the card's sha256 before anything is added.
    A commit pulled before is found in the registry without downloading again
    (by commit sha, even offline). name: register under this name instead of
    the card's.
    """
    url = endpoint_of(endpoint)
    if revision and COMMIT_RE.match(revision):
        known = _pulled(registry, repo_id, revision, url)
        if known:
            return known.ref
    if constants.HF_HUB_OFFLINE:
        commits = sorted({c.source["commit"] for c in registry.search()
                          if _is_hub_source(c.source) and c.source["repo_id"] == repo_id})
        hint = f"; commits of it already here: {', '.join(commits)} (pass one as revision=)" if commits else ""
        raise HubConnectionError(f"cannot pull {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); unset it to "
                                 f"reach the Hub{hint}")
    commit, siblings = resolve(repo_id, revision, endpoint, token)
    known = _pulled(registry, repo_id, commit, url)
    if known:
        return known.ref
    if (repo_id, commit) in _seen:
        raise HubError(f"{repo_id}@{commit[:12]} lists itself among its own ancestors; its card is malformed")
    if "adapter_config.json" in siblings and "pelthub.json" not in siblings:
        raise ModuleFormatError(f"{repo_id} holds a PEFT adapter, not a pelthub module: import it with "
                                f"pelthub.hub.import_peft({repo_id!r}) (`pelthub import {repo_id}`)")
    tmp = Path(registry.blobs.temp_dir())
    try:
        readme = download(repo_id, commit, siblings, [README], tmp, endpoint, token)
        card = _read_card(readme)
        snap = download(repo_id, commit, siblings, sorted(card.files), tmp, endpoint, token)
        _verify(card, snap)
        seen = _seen | {(repo_id, commit)}
        parents = [_pull_parent(registry, repo_id, p, url, token, seen) for p in card.parents]
        return registry.add(snap.directory, name=name or card.name, task=card.task, tags=card.tags,
                            metrics=card.metrics, description=card.description, parents=parents,
                            source={"repo_id": repo_id, "commit": commit, "endpoint": url})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pulled(registry: "Registry", repo_id: str, commit: str, url: str) -> Card | None:
    wanted = {"repo_id": repo_id, "commit": commit, "endpoint": url}
    return next((c for c in registry.search() if _is_hub_source(c.source)
                 and {k: c.source[k] for k in wanted} == wanted), None)


def _read_card(snap: Snapshot) -> Card:
    text = (snap.directory / README).read_text(encoding="utf-8")
    try:
        return Card.from_markdown(text, where=f"{snap.repo_id}/README.md")
    except ModuleFormatError as e:
        raise ModuleFormatError(f"{e}; {snap.repo_id} does not hold a pelthub module (push one with "
                                "Registry.push)") from None


def _verify(card: Card, snap: Snapshot) -> None:
    """Every file the card lists must hash to the sha256 (and size) the card records."""
    for name, meta in card.files.items():
        path = snap.directory / name
        sha, size = file_sha256(path), path.stat().st_size
        if sha != meta["sha256"] or size != meta["size"]:
            raise HubIntegrityError(f"{name} from {snap.repo_id}@{snap.commit[:12]} has sha256 {sha[:16]}... "
                                    f"({size} bytes) but its card records {meta['sha256'][:16]}... ({meta['size']} "
                                    "bytes): the download is damaged or the repo was tampered with; nothing was "
                                    "added")


def _pull_parent(registry: "Registry", child: str, parent: dict[str, Any], url: str, token: str | None,
                 seen: frozenset) -> dict[str, Any]:
    if not (isinstance(parent.get("repo_id"), str) and isinstance(parent.get("commit"), str)):
        raise HubError(f"{child} was built from {parent.get('ref')!r} but its card does not say where that "
                       "module is on the Hub (repo_id, commit); ask its owner to push it with pelthub, which "
                       "pushes the parents first")
    ref = pull(registry, parent["repo_id"], parent["commit"], url, token, _seen=seen)
    return {"ref": ref, "sha256": parent.get("sha256")}  # Registry.add checks the pulled digest against it
