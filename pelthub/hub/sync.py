"""Push registry modules to the Hugging Face Hub and pull them back, verified.

A pushed repo holds the module files (pelthub.json, modules.safetensors) and
a README.md whose front matter carries the whole card, so a pull restores
the card and checks every file against the sha256 it lists. One push is one
commit (`upload_folder`); a tag, if asked for, points at that commit.

A pull trusts only content hashes: the Hub's record of each file and the
sha256 the card lists for it (see fetch.py for where the bytes land). It
never adds a version to a local name that came from somewhere else unless
asked to (name=), and it walks parents with a stack, within depth and count
limits (limits.py), never by recursion.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from huggingface_hub import constants

from huggingface_hub.errors import HfHubHTTPError

from ..errors import (HubConnectionError, HubError, HubIntegrityError, HubPushError, ModuleFormatError, PeltError,
                      RegistryError)
from ..model.io import CONFIG_FILE, MAX_CONFIG_BYTES
from ..registry.blobs import file_sha256
from ..registry.card import HUB_ID_RE, Card, check_name
from .client import (COMMIT_RE, api, bounded, check_online, check_repo_id, endpoint_of, public, resolve, scrub,
                     too_slow, translated)
from .fetch import Snapshot, download
from .limits import (MAX_CARD_FILES, MAX_MODULE_BYTES_ENV, max_card_bytes, max_depth as depth_limit,
                     max_module_bytes, max_parents as parents_limit)
from .transport import http

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
    card = publishable(card)
    (directory / README).write_text(card.to_markdown() + (_hub_usage(card, repo_id) if repo_id else ""),
                                    encoding="utf-8")
    return directory


def publishable(card: Card, url: str | None = None) -> Card:
    """The card as it may leave this machine: no local paths, no credentials in endpoints."""
    base = dict(card.base_model)
    if is_local_path(base["name"]):
        base["name"] = ""
    source = card.source
    if source is not None:
        source = {k: public(v) if k == "endpoint" and isinstance(v, str) else v for k, v in source.items()
                  if k != "path" and not (isinstance(v, str) and is_local_path(v))}
    return dataclasses.replace(card, base_model=base, source=source or None)


def is_local_path(text: str) -> bool:
    """Whether a name reads as a path on this machine (absolute, home, relative-dot, Windows) rather than an id."""
    return (os.path.isabs(text) or text.startswith(("~", "./", "../")) or "\\" in text
            or (len(text) > 2 and text[1] == ":" and text[0].isalpha()))


def _hub_usage(card: Card, repo_id: str) -> str:
    base = card.base_model["name"] or "the base model named above"
    return (f"\n## From the Hub\n\n```python\nimport pelthub as ph\nreg = ph.Registry()\n"
            f"model = reg.load(reg.pull({repo_id!r}), base)   # base: {base}\n```\n")


# ----- push -----
def push(registry: "Registry", ref: str, repo_id: str, revision: str | None = None, private: bool = False,
         token: str | None = None, endpoint: str | None = None, tag: str | None = None,
         timeout: float | None = None) -> str:
    """Upload module `ref` to `repo_id` (created if needed) in one commit; returns the commit sha.

    revision: the branch to commit to (created from the default branch if
    missing); tag: a tag to put on the new commit. Parents must be on the same
    Hub already (push them first). A repo this push created is deleted again
    if the commit fails; if only the tag fails, HubPushError says which
    commit landed (its `.commit`), so nothing needs pushing twice.
    """
    check_repo_id(repo_id)
    card = registry.get(ref)
    url = endpoint_of(endpoint)
    what = f"push {card.ref} to {repo_id}"
    check_online(what)
    published = dataclasses.replace(card, parents=[_located(registry, card, p, public(url)) for p in card.parents])
    hub = api(endpoint, token)
    with translated(what, repo_id, revision, endpoint, token, timeout):
        repo_id, created = _create(hub, repo_id, private)
    try:
        with tempfile.TemporaryDirectory(dir=registry.blobs.tmp, prefix=f"{os.getpid()}-") as tmp, \
                translated(what, repo_id, revision, endpoint, token, timeout):
            if tag and tag in {t.name for t in hub.list_repo_refs(repo_id).tags}:  # refuse before committing
                raise HubError(f"cannot {what}: {repo_id} already has a tag {tag!r}; pick another tag")
            folder = write_folder(registry, published, Path(tmp), repo_id)
            if revision and revision != "main":
                hub.create_branch(repo_id, branch=revision, exist_ok=True)
            try:
                commit = hub.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                           commit_message=f"pelthub push {card.ref}").oid
            except RuntimeError as e:  # the client wraps a failed LFS upload in a bare RuntimeError
                cause = e.__cause__ or e
                if isinstance(cause, (TimeoutError, http.TimeoutException)):
                    raise too_slow(url, what, timeout) from None
                raise HubError(f"cannot {what}: uploading the files failed ({type(cause).__name__}: "
                               f"{scrub(str(cause), token)[:160]}); try again") from None
    except BaseException as e:
        if created and isinstance(e, Exception):
            raise _deleted(hub, repo_id, e, what, endpoint, token, timeout) from None
        raise
    _log_push(registry, {"digest": card.digest, "ref": card.ref, "repo_id": repo_id, "commit": commit,
                         "endpoint": public(url)})
    if tag:
        _tag(hub, repo_id, tag, commit, what, endpoint, token, timeout)
    return commit


def _create(hub: Any, repo_id: str, private: bool) -> tuple[str, bool]:
    """(repo id, whether this call created it).

    Later steps of a push run where a failure deletes the repo again and is
    reported as a HubError; this first one parses the Hub's answer itself.
    """
    try:
        return hub.create_repo(repo_id, private=private, exist_ok=False).repo_id, True
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 409 or status == 403 and hub.repo_exists(repo_id):  # there already (403: may not create here)
            return repo_id, False
        raise
    except (ValueError, LookupError, TypeError, AttributeError) as e:  # the client reading a malformed answer
        raise HubError(f"cannot create {repo_id}: the Hub at {public(hub.endpoint)} answered malformed JSON "
                       f"({type(e).__name__}); check the endpoint (endpoint=, HF_ENDPOINT)") from None


def _deleted(hub: Any, repo_id: str, error: Exception, what: str, endpoint: str | None, token: str | None,
             timeout: float | None) -> PeltError:
    """Delete the repo a failed push created; the error returned says whether that worked."""
    try:
        with bounded(timeout, endpoint, token):
            hub.delete_repo(repo_id)
        note = f"the empty repo {repo_id} it created was deleted again"
    except Exception as e:  # noqa: BLE001 - report it, do not mask the push's own error
        note = f"the repo {repo_id} it created is empty and could not be deleted ({type(e).__name__}); delete it"
    if isinstance(error, PeltError):
        return type(error)(f"{error}; {note}")
    return HubError(f"cannot {what}: {type(error).__name__}: {scrub(str(error))[:200]}; {note}")


def _tag(hub: Any, repo_id: str, tag: str, commit: str, what: str, endpoint: str | None, token: str | None,
         timeout: float | None) -> None:
    try:
        with translated(f"tag {repo_id} {tag!r}", repo_id, commit, endpoint, token, timeout):
            hub.create_tag(repo_id, tag=tag, revision=commit)
    except HubError as e:
        error = HubPushError(f"{what}: the commit {commit} landed, but tagging it {tag!r} failed ({e}); do not push "
                             f"again: tag that commit (HfApi().create_tag({repo_id!r}, tag={tag!r}, "
                             f"revision={commit!r}))")
        error.commit = commit
        raise error from None


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
    yield from ({**c.source, "endpoint": public(c.source["endpoint"])} for c in registry.search()
                if c.digest == digest and _is_hub_source(c.source))


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
        except (ValueError, RecursionError):  # a torn last line from a crash: the others still count
            continue
        if isinstance(entry, dict) and _is_hub_source(entry):
            entries.append(entry)
    return entries


def _is_hub_source(source: Any) -> bool:
    return isinstance(source, dict) and all(isinstance(source.get(k), str) for k in ("repo_id", "commit", "endpoint"))


# ----- pull -----
@dataclass
class _Node:
    """One module of a pull: where it is, and once fetched, its card and downloaded files."""

    repo_id: str
    commit: str
    depth: int
    card: Card | None = None
    snap: Snapshot | None = None
    parents: list[tuple[str, str]] = field(default_factory=list)  # (repo_id, commit) of each parent


def pull(registry: "Registry", repo_id: str, revision: str | None = None, endpoint: str | None = None,
         token: str | None = None, name: str | None = None, timeout: float | None = None,
         max_depth: int | None = None, max_parents: int | None = None) -> str:
    """Download a pushed module (and, first, the modules it was built from) into `registry`; returns its ref.

    Every file is checked against the Hub's record and the card's sha256
    before anything is added. A commit pulled before is found in the
    registry without downloading again (by commit sha, even offline).
    name: register under this name instead of the card's; needed when the
    card's name is taken here by a module from elsewhere. timeout: seconds
    per request ($PELTHUB_HUB_TIMEOUT, 30); max_depth / max_parents: how
    deep a chain of parents, and how many parents in all, a pull follows
    ($PELTHUB_MAX_DEPTH, 32; $PELTHUB_MAX_PARENTS, 100). A card may declare
    at most 64 files and $PELTHUB_MAX_MODULE_BYTES (16 GiB) in all.
    """
    check_repo_id(repo_id)
    if name is not None:
        check_name(name)
    url = endpoint_of(endpoint)
    limits = depth_limit(max_depth), parents_limit(max_parents)
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
    tmp = Path(registry.blobs.temp_dir())
    try:
        commit, siblings = resolve(repo_id, revision, endpoint, token, timeout)
        known = _pulled(registry, repo_id, commit, url)
        if known:
            return known.ref
        _refuse_peft(repo_id, siblings)
        root = _Node(repo_id, commit, 0)
        _fetch_node(root, siblings, tmp / "0", endpoint, token, timeout)
        return _add_all(registry, _walk(registry, root, tmp, endpoint, token, timeout, limits), name, url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _walk(registry: "Registry", root: _Node, tmp: Path, endpoint: str | None, token: str | None,
          timeout: float | None, limits: tuple[int, int]) -> list[_Node]:
    """Fetch `root`'s ancestors (depth-first, with a stack); returns the modules to add, parents first.

    Ancestors already in the registry (same repo, commit and Hub) are not
    fetched: their node keeps card None. Raises past the depth or count limit.
    """
    url = endpoint_of(endpoint)
    deepest, most = limits
    nodes: dict[tuple[str, str], _Node] = {(root.repo_id, root.commit): root}
    order: list[_Node] = []
    stack: list[tuple[_Node, bool]] = [(root, False)]
    path: set[tuple[str, str]] = set()
    while stack:
        node, done = stack.pop()
        key = (node.repo_id, node.commit)
        if done:
            path.discard(key)
            order.append(node)
            continue
        path.add(key)
        stack.append((node, True))
        if node.card and len(node.card.parents) > most:
            raise HubError(f"cannot pull {root.repo_id}: {node.repo_id} was built from {len(node.card.parents)} "
                           f"modules, more than {most}; pass max_parents= (or set $PELTHUB_MAX_PARENTS) to fetch "
                           "more; nothing was added")
        for parent in node.card.parents if node.card else []:
            where = _parent_location(node, parent)
            if where in path:
                raise HubError(f"{node.repo_id}@{node.commit[:12]} lists {where[0]}@{where[1][:12]} among its own "
                               "ancestors; its card is malformed and nothing was added")
            node.parents.append(where)
            if where in nodes:
                continue
            if node.depth + 1 > deepest:
                raise HubError(f"cannot pull {root.repo_id}: its parents go deeper than {deepest} levels (at "
                               f"{node.repo_id}); pass max_depth= (or set $PELTHUB_MAX_DEPTH) to follow deeper "
                               "chains; nothing was added")
            if len(nodes) > most:
                raise HubError(f"cannot pull {root.repo_id}: it was built from more than {most} modules; pass "
                               "max_parents= (or set $PELTHUB_MAX_PARENTS) to fetch more; nothing was added")
            child = _Node(where[0], where[1], node.depth + 1)
            nodes[where] = child
            if not _pulled(registry, *where, url):
                _, siblings = resolve(where[0], where[1], endpoint, token, timeout)
                _fetch_node(child, siblings, tmp / str(len(nodes)), endpoint, token, timeout)
            stack.append((child, False))
    return order


def _parent_location(node: _Node, parent: dict[str, Any]) -> tuple[str, str]:
    repo, commit = parent.get("repo_id"), parent.get("commit")
    if not (isinstance(repo, str) and isinstance(commit, str)):
        raise HubError(f"{node.repo_id} was built from {parent.get('ref')!r} but its card does not say where that "
                       "module is on the Hub (repo_id, commit); ask its owner to push it with pelthub, which "
                       "pushes the parents first")
    if not (HUB_ID_RE.match(repo) and ".." not in repo and COMMIT_RE.match(commit)):
        raise HubIntegrityError(f"{node.repo_id}@{node.commit[:12]} names parent {repo[:80]!r} at {commit[:50]!r}, "
                                "which is not a repo id and commit sha; its card is malformed and nothing was added")
    return repo, commit


def _fetch_node(node: _Node, siblings: dict, folder: Path, endpoint: str | None, token: str | None,
                timeout: float | None) -> None:
    """Download the card, then the files it lists, into `folder`, and check them against the card."""
    _refuse_peft(node.repo_id, siblings)
    readme = download(node.repo_id, node.commit, siblings, [README], folder / "card", endpoint, token, timeout,
                      max_bytes={README: max_card_bytes()})
    card = _read_card(readme)
    _check_declared(node.repo_id, card)
    caps = {CONFIG_FILE: MAX_CONFIG_BYTES, **{n: f["size"] for n, f in card.files.items() if n != CONFIG_FILE}}
    node.snap = download(node.repo_id, node.commit, siblings, sorted(card.files), folder / "files", endpoint, token,
                         timeout, max_bytes=caps)
    _verify(card, node.snap)
    node.card = card


def _check_declared(repo_id: str, card: Card) -> None:
    """A card may declare at most MAX_CARD_FILES files and max_module_bytes() in all: refused before any download."""
    if len(card.files) > MAX_CARD_FILES:
        raise HubError(f"{repo_id}/README.md declares {len(card.files)} files; a pelthub module has at most "
                       f"{MAX_CARD_FILES}, so nothing was downloaded")
    total, most = sum(f["size"] for f in card.files.values()), max_module_bytes()
    if total > most:
        raise HubError(f"{repo_id}/README.md declares {total:,} bytes of files; pelthub pulls at most {most:,} for "
                       f"one module, so nothing was downloaded (raise it with ${MAX_MODULE_BYTES_ENV})")


def _refuse_peft(repo_id: str, siblings: dict) -> None:
    if "adapter_config.json" in siblings and "pelthub.json" not in siblings:
        raise ModuleFormatError(f"{repo_id} holds a PEFT adapter, not a pelthub module: import it with "
                                f"pelthub.hub.import_peft({repo_id!r}) (`pelthub import {repo_id}`)")


def _add_all(registry: "Registry", order: list[_Node], name: str | None, url: str) -> str:
    """Add the fetched modules, parents first; returns the ref of the last (the one asked for)."""
    refs: dict[tuple[str, str], str] = {}
    for node in order:
        key = (node.repo_id, node.commit)
        if node.card is None or node.snap is None:  # an ancestor pulled before
            known = _pulled(registry, node.repo_id, node.commit, url)
            if known is None:
                raise HubError(f"{node.repo_id}@{node.commit[:12]} was removed from the registry during this pull; "
                               "pull again")
            refs[key] = known.ref
            continue
        card, snap, asked = node.card, node.snap, node is order[-1]
        if not (asked and name):
            fix = (f"pass name= to register it under another name, e.g. reg.pull({node.repo_id!r}, name='<new name>') "
                   "(`pelthub pull --name`)" if asked else
                   f"pull that parent first under another name: reg.pull({node.repo_id!r}, revision={node.commit!r}, "
                   "name='<new name>')")
            refuse_squatting(registry, card.name, {"repo_id": node.repo_id, "commit": node.commit,
                                                   "endpoint": snap.endpoint}, fix)
        parents = [{"ref": refs[where], "sha256": p.get("sha256")} for p, where in zip(card.parents, node.parents)]
        refs[key] = registry.add(snap.directory, name=name if asked and name else card.name, task=card.task,
                                 tags=card.tags, metrics=card.metrics, description=card.description,
                                 parents=parents,
                                 source={"repo_id": node.repo_id, "commit": node.commit, "endpoint": snap.endpoint})
    return refs[(order[-1].repo_id, order[-1].commit)]


def refuse_squatting(registry: "Registry", name: str, source: dict[str, str], fix: str) -> None:
    """A module from a Hub repo may not add a version to a local name whose modules came from anywhere else.

    source: {"repo_id", "commit", "endpoint"} (public form) of the module; fix: what to do instead.
    """
    try:
        versions = registry.versions(name)
    except RegistryError:
        return
    alien = [c for c in versions if not (_is_hub_source(c.source) and c.source["repo_id"] == source["repo_id"]
                                         and c.source["endpoint"] == source["endpoint"])]
    if not alien:
        return
    theirs = alien[-1].source
    origin = (f"{theirs['repo_id']} on {theirs['endpoint']}" if _is_hub_source(theirs)
              else "this machine" if not theirs else "elsewhere")
    raise RegistryError(f"{source['repo_id']}@{source['commit'][:12]} would be registered as {name!r}, but {name!r} "
                        f"here holds {alien[-1].ref} from {origin}; adding it would make {name!r} load the "
                        f"downloaded weights. Nothing was added: {fix}")


def _pulled(registry: "Registry", repo_id: str, commit: str, url: str) -> Card | None:
    wanted = {"repo_id": repo_id, "commit": commit, "endpoint": public(url)}
    return next((c for c in registry.search() if _is_hub_source(c.source)
                 and {k: c.source[k] for k in wanted} == wanted), None)


def _read_card(snap: Snapshot) -> Card:
    text = (snap.directory / README).read_text(encoding="utf-8", errors="replace")
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
