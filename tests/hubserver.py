"""A small in-memory Hugging Face Hub API server for tests (standard library + PyYAML).

It speaks enough of the Hub's HTTP API on 127.0.0.1 for the real ``huggingface_hub``
client (LFS mode, ``HF_HUB_DISABLE_XET`` patched on) to create repos, push commits with
``upload_folder``/``create_commit``, tag, list, inspect and download them::

    with LocalHub() as hub:
        api = HfApi(endpoint=hub.endpoint, token="test-token")

Every commit gets a 40-hex sha; branches and tags point at commits; old commits keep
serving their content. Errors carry the ``X-Error-Code`` headers the client maps to
``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``RemoteEntryNotFoundError``.
Unexpected server bugs answer 400 (not 500) so the client fails at once instead of
retrying with back-off; they are also kept in ``LocalHub.errors``.

It can also lie and fail on demand, for the security tests: ``lie(repo_id, sha=..., etag=...)``
answers a hostile commit sha / ETag for a repo; ``fail(method, path_regex, status=...,
hang=..., delay=...)`` makes matching requests answer an error status, never answer, or
answer late; ``fail(..., location=...)`` redirects them, ``body=``/``headers=`` replace the
answer's body or add headers (a Link to another host, a Content-Encoding), ``drip=`` sends the
body one byte at a time; ``put_files`` commits files directly (e.g. a huge README, or hundreds
of repos forming a parent chain) without going through the client. Every request's
Authorization header is kept in ``authorizations``, to check where tokens went.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

try:
    import yaml  # a dependency of huggingface_hub
except ImportError:  # pragma: no cover
    yaml = None

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".gguf", ".onnx", ".h5", ".msgpack")
LFS_MIN_SIZE = 10_000
GITATTRIBUTES = b"".join(b"*%s filter=lfs diff=lfs merge=lfs -text\n" % s.encode() for s in LFS_SUFFIXES)
CARD_RE = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, body=None):
        super().__init__(message)
        self.status, self.code, self.headers, self.body = status, code, headers or {}, body

    def response(self):
        headers = {"X-Error-Message": self.args[0].encode("ascii", "backslashreplace").decode(), **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return _json(self.body if self.body is not None else {"error": self.args[0]}, self.status, headers)


def _json(obj, status: int = 200, headers: dict | None = None):
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()


@dataclass(frozen=True)
class _Entry:
    """A file at a commit. ``data`` may be tampered with; the other fields are the recorded metadata."""

    data: bytes
    size: int
    oid: str  # git blob sha1 (of the LFS pointer for LFS files)
    sha256: str | None = None  # set for LFS files
    pointer_size: int = 0

    @classmethod
    def make(cls, data: bytes, lfs: bool) -> "_Entry":
        if not lfs:
            return cls(data, len(data), _git_oid(data))
        sha = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
        return cls(data, len(data), _git_oid(pointer), sha, len(pointer))

    @property
    def etag(self) -> str:
        return self.sha256 or self.oid

    def info(self, path: str) -> dict:
        out = {"type": "file", "path": path, "size": self.size, "oid": self.oid}
        if self.sha256:
            out["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return out


@dataclass
class _Commit:
    sha: str
    parent: str | None
    files: dict[str, _Entry]
    title: str
    message: str = ""
    date: str = field(default_factory=_now)


class _Repo:
    _counter = itertools.count()

    def __init__(self, repo_type: str, repo_id: str, private: bool):
        self.type, self.id, self.private, self.created = repo_type, repo_id, private, _now()
        self.commits: dict[str, _Commit] = {}
        self.branches: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.branches["main"] = self.add_commit(None, {".gitattributes": _Entry.make(GITATTRIBUTES, False)}, "initial commit").sha

    def add_commit(self, parent: str | None, files: dict, title: str, message: str = "") -> _Commit:
        seed = json.dumps([self.id, parent, title, sorted((p, e.oid) for p, e in files.items()), next(self._counter)])
        commit = _Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, files, title, message)
        self.commits[commit.sha] = commit
        return commit

    def resolve(self, rev: str) -> _Commit:
        for name in (rev, rev.removeprefix("refs/heads/"), rev.removeprefix("refs/tags/")):
            sha = self.branches.get(name) or self.tags.get(name) or (name if name in self.commits else None)
            if sha:
                return self.commits[sha]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    @property
    def head(self) -> _Commit:
        return self.commits[self.branches["main"]]


def _card(files: dict[str, _Entry]) -> dict | None:
    """The README's front matter; none when it is not YAML or uses aliases (an alias bomb must not stall the hub)."""
    readme = files.get("README.md")
    match = CARD_RE.match(readme.data.decode("utf-8", "replace")) if readme else None
    if not match or yaml is None or re.search(r"(^|[\s\[{,:])\*\w", match.group(2)):
        return None
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _as_list(value) -> list[str]:
    return [str(v) for v in (value if isinstance(value, list) else [value] if value else [])]


def _tags(card: dict, files: dict) -> list[str]:
    tags = _as_list(card.get("library_name")) + _as_list(card.get("tags"))
    tags += ["safetensors"] if any(p.endswith(".safetensors") for p in files) else []
    tags += [f"dataset:{d}" for d in _as_list(card.get("datasets"))]
    tags += [f"base_model:{b}" for b in _as_list(card.get("base_model"))]
    tags += [f"license:{x}" for x in _as_list(card.get("license"))] + _as_list(card.get("pipeline_tag"))
    return list(dict.fromkeys(tags))


def _tree_entries(commit: _Commit, path: str, recursive: bool) -> list[dict]:
    prefix = f"{path}/" if path else ""
    files, dirs = {}, set()
    for p, entry in commit.files.items():
        if not p.startswith(prefix):
            continue
        parts = p[len(prefix):].split("/")
        if recursive:
            files[p] = entry
            dirs.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
        elif len(parts) == 1:
            files[p] = entry
        else:
            dirs.add(prefix + parts[0])
    if path and not files and not dirs:
        raise HubError(404, f"{path} does not exist at {commit.sha}", "EntryNotFound")
    out = [_dir_info(commit, d) for d in sorted(dirs)]
    return out + [files[p].info(p) for p in sorted(files)]


def _dir_info(commit: _Commit, path: str) -> dict:
    return {"type": "directory", "path": path, "size": 0, "oid": hashlib.sha1(f"{commit.sha}:{path}".encode()).hexdigest()}


# --------------------------------------------------------------------------- handlers
# Each handler gets (hub, req, **url groups) and returns (status, headers, body) or raises HubError.


def h_whoami(hub, req):
    if not hub.authorized(req, always=True):
        raise HubError(401, "Invalid credentials in Authorization header")
    return _json({"type": "user", "name": hub.user, "fullname": hub.user, "orgs": [], "isPro": False,
                  "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}}})


def h_validate_yaml(hub, req):
    content = req.json().get("content", "")
    match = CARD_RE.match(content)
    try:
        meta = yaml.safe_load(match.group(2)) if match and yaml else {}
    except yaml.YAMLError as err:
        return _json({"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []}, 400)
    if meta is not None and not isinstance(meta, dict):
        return _json({"errors": [{"message": "metadata must be a mapping"}], "warnings": []}, 400)
    return _json({"errors": [], "warnings": []})


def _repo_id_from_body(hub, body: dict) -> tuple[str, str]:
    return body.get("type") or "model", f"{body.get('organization') or hub.user}/{body['name']}"


def h_create_repo(hub, req):
    hub.require_write(req)
    body = req.json()
    repo_type, repo_id = _repo_id_from_body(hub, body)
    url = f"{hub.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
    if (repo_type, repo_id) in hub.repos:
        return _json({"error": f"You already created this {repo_type} repo", "url": url}, 409)
    private = bool(body.get("private")) or body.get("visibility") == "private"
    hub.repos[repo_type, repo_id] = _Repo(repo_type, repo_id, private)
    return _json({"url": url, "name": repo_id, "id": repo_id})


def h_delete_repo(hub, req):
    hub.require_write(req)
    key = _repo_id_from_body(hub, req.json())
    hub.repo(*key)
    del hub.repos[key]
    return _json({})


def _info(hub, repo: _Repo, commit: _Commit, full: bool, blobs: bool = False) -> dict:
    card = _card(commit.files) or {}
    namespace = repo.id.split("/")[0] if "/" in repo.id else None
    sha = hub.lies.get(repo.id, {}).get("sha") or commit.sha
    info = {"_id": repo.id, "id": repo.id, "author": namespace, "sha": sha, "lastModified": commit.date,
            "createdAt": repo.created, "private": repo.private, "disabled": False, "gated": False,
            "downloads": 0, "likes": 0, "tags": _tags(card, commit.files),
            "library_name": card.get("library_name"), "pipeline_tag": card.get("pipeline_tag")}
    if full:
        info["cardData"] = card or None
        info["siblings"] = [_sibling(p, e, blobs) for p, e in sorted(commit.files.items())]
    return info


def _sibling(path: str, entry: _Entry, blobs: bool) -> dict:
    if not blobs:
        return {"rfilename": path}
    lfs = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size} if entry.sha256 else None
    return {"rfilename": path, "size": entry.size, "blobId": entry.oid, "lfs": lfs}


def h_list(hub, req, type):
    q, repo_type = req.query, type[:-1]
    filters = [f for value in q.get("filter", []) for f in value.split(",") if f]
    search, author = (q.get("search") or [""])[0].lower(), (q.get("author") or [None])[0]
    full = any(k in q for k in ("full", "cardData", "expand"))
    out = []
    for (rtype, rid), repo in hub.repos.items():
        if rtype != repo_type or repo.private and not hub.authorized(req):
            continue
        info = _info(hub, repo, repo.head, full=True)
        if author and info["author"] != author or search not in rid.lower():
            continue
        if all(f in info["tags"] or f == rid for f in filters):
            out.append(info if full else {k: v for k, v in info.items() if k not in ("cardData", "siblings")})
    sort = (q.get("sort") or ["id"])[0]
    out.sort(key=lambda i: (str(i.get(sort, "")), i["id"]), reverse=(q.get("direction") or ["1"])[0] == "-1")
    limit = int((q.get("limit") or [0])[0]) or None
    return _json(out[:limit])


def h_info(hub, req, type, repo, rev="main"):
    r = hub.repo(type[:-1], repo)
    return _json(_info(hub, r, r.resolve(rev), full=True, blobs="blobs" in req.query))


def h_tree(hub, req, type, repo, rev, path=""):
    commit = hub.repo(type[:-1], repo).resolve(rev)
    recursive = (req.query.get("recursive") or ["false"])[0].lower() in ("true", "1")
    return _json(_tree_entries(commit, path.strip("/"), recursive))


def h_paths_info(hub, req, type, repo, rev):
    commit = hub.repo(type[:-1], repo).resolve(rev)
    form = parse_qs(req.body.decode())
    paths = form.get("paths") or (json.loads(req.body).get("paths", []) if req.body.startswith(b"{") else [])
    out = []
    for path in (p.strip("/") for p in paths):
        if path in commit.files:
            out.append(commit.files[path].info(path))
        elif any(p.startswith(path + "/") for p in commit.files):
            out.append(_dir_info(commit, path))
    return _json(out)


def h_commits(hub, req, type, repo, rev):
    r = hub.repo(type[:-1], repo)
    commit, out = r.resolve(rev), []
    while commit:
        out.append({"id": commit.sha, "title": commit.title, "message": commit.message, "date": commit.date,
                    "authors": [{"user": hub.user}]})
        commit = r.commits.get(commit.parent) if commit.parent else None
    return _json(out)


def h_refs(hub, req, type, repo):
    r = hub.repo(type[:-1], repo)

    def refs(kind, mapping):
        return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in sorted(mapping.items())]

    return _json({"branches": refs("heads", r.branches), "tags": refs("tags", r.tags), "converts": [], "pullRequests": []})


def h_preupload(hub, req, type, repo, rev):
    hub.require_write(req)
    head = hub.repo(type[:-1], repo).resolve(rev)
    files = []
    for f in req.json().get("files", []):
        lfs = f["path"].endswith(LFS_SUFFIXES) or f.get("size", 0) > LFS_MIN_SIZE
        existing = head.files.get(f["path"])
        oid = existing and (existing.sha256 if lfs else (None if existing.sha256 else existing.oid))
        files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
    return _json({"files": files, "commitOid": head.sha})


def h_commit(hub, req, type, repo, rev):
    hub.require_write(req)
    r = hub.repo(type[:-1], repo)
    if "create_pr" in req.query:
        raise HubError(400, "LocalHub does not support pull requests")
    if rev not in r.branches:
        raise HubError(404, f"Invalid rev id: {rev} (commits go to a branch)", "RevisionNotFound")
    lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
    header = lines[0]["value"] if lines and lines[0]["key"] == "header" else {}
    parent = r.commits[r.branches[rev]]
    if header.get("parentCommit") and header["parentCommit"] != parent.sha:
        raise HubError(412, f"A commit has happened since {header['parentCommit']}. Please refresh and try again.")
    files = dict(parent.files)
    for item in lines[1:]:
        key, value = item["key"], item["value"]
        path = value["path"].strip("/")
        if key == "file":
            files[path] = _Entry.make(base64.b64decode(value["content"]), lfs=False)
        elif key == "lfsFile":
            if value["oid"] not in hub.lfs:
                raise HubError(400, f"LFS object {value['oid']} for {path} was not uploaded")
            files[path] = _Entry.make(hub.lfs[value["oid"]], lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            files = {p: e for p, e in files.items() if not p.startswith(path + "/")}
        else:
            raise HubError(400, f"Unknown commit operation: {key}")
    commit = r.add_commit(parent.sha, files, header.get("summary") or "commit", header.get("description", ""))
    r.branches[rev] = commit.sha
    url = f"{hub.endpoint}/{URL_PREFIX[r.type]}{r.id}/commit/{commit.sha}"
    return _json({"success": True, "commitOid": commit.sha, "commitUrl": url, "pullRequestUrl": None})


def h_lfs_batch(hub, req, prefix, repo):
    hub.require_write(req)
    hub.repo({"datasets/": "dataset", "spaces/": "space"}.get(prefix, "model"), repo)
    objects = []
    for obj in req.json().get("objects", []):
        out = {"oid": obj["oid"], "size": obj["size"]}
        if obj["oid"] not in hub.lfs:
            out["authenticated"] = True
            out["actions"] = {"upload": {"href": f"{hub.endpoint}/lfs-upload/{obj['oid']}"}}
        objects.append(out)
    status, headers, body = _json({"transfer": "basic", "objects": objects})
    return status, {**headers, "Content-Type": "application/vnd.git-lfs+json"}, body


def h_lfs_put(hub, req, oid):
    # Like a presigned S3 URL: the client sends no auth header; the sha256 guards the content.
    if hashlib.sha256(req.body).hexdigest() != oid:
        raise HubError(400, f"sha256 of uploaded content does not match {oid}")
    hub.lfs[oid] = req.body
    return 200, {"ETag": f'"{oid}"'}, b""


def h_create_ref(hub, req, type, repo, kind, rev):
    hub.require_write(req)
    r, body = hub.repo(type[:-1], repo), req.json()
    name, start = (body["tag"], rev) if kind == "tag" else (rev, body.get("startingPoint") or "main")
    mapping = r.tags if kind == "tag" else r.branches
    if name in mapping:
        raise HubError(409, f"{kind} {name} already exists")
    mapping[name] = r.resolve(start).sha
    return _json({})


def h_delete_ref(hub, req, type, repo, kind, rev):
    hub.require_write(req)
    mapping = getattr(hub.repo(type[:-1], repo), "tags" if kind == "tag" else "branches")
    if rev not in mapping or rev == "main" and kind == "branch":
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
    del mapping[rev]
    return _json({})


def h_resolve(hub, req, prefix, repo, rev, path):
    r = hub.repo({"datasets/": "dataset", "spaces/": "space"}.get(prefix, "model"), repo)
    lie = hub.lies.get(r.id, {})
    commit = r.head if rev == lie.get("sha") else r.resolve(rev)
    entry = commit.files.get(path)
    if entry is None:
        raise HubError(404, f"{path} does not exist at {commit.sha}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
    sha, etag = lie.get("sha") or commit.sha, lie.get("etag") or entry.etag
    headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}
    if entry.sha256:
        headers.update({"X-Linked-Size": str(entry.size), "X-Linked-Etag": f'"{lie.get("etag") or entry.sha256}"'})
    if req.command == "HEAD":
        return 200, {**headers, "Content-Length": str(entry.size)}, b""
    data, rng = entry.data, req.headers.get("Range")
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip()) if rng else None
    if not match:
        return 200, headers, data
    start, end = match.groups()
    first = int(start) if start else max(len(data) - int(end or 0), 0)
    last = min(int(end), len(data) - 1) if start and end else len(data) - 1
    if first >= len(data) or first > last:
        return 416, {**headers, "Content-Range": f"bytes */{len(data)}"}, b""
    return 206, {**headers, "Content-Range": f"bytes {first}-{last}/{len(data)}"}, data[first:last + 1]


T = r"(?P<type>models|datasets|spaces)"
REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
PREFIX = r"(?P<prefix>datasets/|spaces/)?"
ROUTES = [(set(methods.split()), re.compile(pattern), fn) for methods, pattern, fn in [
    ("GET", r"/api/whoami-v2", h_whoami),
    ("POST", r"/api/validate-yaml", h_validate_yaml),
    ("POST", r"/api/repos/create", h_create_repo),
    ("DELETE", r"/api/repos/delete", h_delete_repo),
    ("GET", rf"/api/{T}", h_list),
    ("GET", rf"/api/{T}/{REPO}/revision/(?P<rev>[^/]+)", h_info),
    ("GET", rf"/api/{T}/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", h_tree),
    ("POST", rf"/api/{T}/{REPO}/paths-info/(?P<rev>[^/]+)", h_paths_info),
    ("GET", rf"/api/{T}/{REPO}/commits/(?P<rev>[^/]+)", h_commits),
    ("GET", rf"/api/{T}/{REPO}/refs", h_refs),
    ("POST", rf"/api/{T}/{REPO}/preupload/(?P<rev>[^/]+)", h_preupload),
    ("POST", rf"/api/{T}/{REPO}/commit/(?P<rev>[^/]+)", h_commit),
    ("POST", rf"/api/{T}/{REPO}/(?P<kind>tag|branch)/(?P<rev>[^/]+)", h_create_ref),
    ("DELETE", rf"/api/{T}/{REPO}/(?P<kind>tag|branch)/(?P<rev>[^/]+)", h_delete_ref),
    ("GET", rf"/api/{T}/{REPO}", h_info),
    ("POST", rf"/{PREFIX}{REPO}\.git/info/lfs/objects/batch", h_lfs_batch),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", h_lfs_put),
    ("GET HEAD", rf"/{PREFIX}{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", h_resolve),
]]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    def do_GET(self):
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, *args):  # keep pytest output quiet
        pass

    def json(self) -> dict:
        return json.loads(self.body or b"{}")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self):
        hub: LocalHub = self.server.hub
        url = urlsplit(self.path)
        self.query = parse_qs(url.query, keep_blank_values=True)
        self.body = self._read_body()
        hub.requests.append((self.command, url.path))
        hub.authorizations.append((self.command, url.path, self.headers.get("Authorization")))
        fault = hub.fault_for(self.command, url.path)
        if fault is not None and fault.hang:
            hub.stopping.wait(fault.hang)  # never answer (until the hub stops or `hang` seconds pass)
            self.close_connection = True
            return
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        try:
            if fault is not None and fault.status and fault.body is None:
                raise HubError(fault.status, f"LocalHub fault: {self.command} {url.path} answers {fault.status}")
            for methods, pattern, fn in ROUTES:
                match = pattern.fullmatch(url.path)
                if match and self.command in methods:
                    args = {k: unquote(v or "") for k, v in match.groupdict().items()}
                    with hub.lock:
                        status, headers, body = fn(hub, self, **args)
                    break
            else:
                raise HubError(404, f"LocalHub has no route for {self.command} {url.path}")
        except HubError as err:
            status, headers, body = err.response()
        except Exception as err:  # a server bug: 400 so the client does not retry for ~20 s
            hub.errors.append(traceback.format_exc())
            status, headers, body = HubError(400, f"LocalHub internal error: {err!r}").response()
        if fault is not None:
            status, headers, body = fault.answer(status, headers, body, self.path)
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault is not None and fault.drip:
            self._drip(body, fault.drip, hub.stopping)
        else:
            self.wfile.write(body)

    def _drip(self, body: bytes, every: float, stopping: threading.Event) -> None:
        """Send `body` one byte per `every` seconds (until the client hangs up or the hub stops)."""
        try:
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                if stopping.wait(every):
                    break
        except OSError:
            pass
        self.close_connection = True


@dataclass
class Fault:
    """Requests whose "METHOD path" matches ``pattern`` answer ``status``, wait ``delay`` s, or ``hang`` (s).

    ``location``: answer 302 to it (``{path}`` stands for the request's path and query); ``body``: answer it
    (status 200 unless ``status``); ``headers``: added to the answer; ``drip``: seconds between body bytes.
    """

    method: str
    pattern: re.Pattern
    status: int | None = None
    hang: float = 0.0
    delay: float = 0.0
    times: int | None = None  # None: every matching request
    location: str | None = None
    body: bytes | None = None
    headers: dict = field(default_factory=dict)
    drip: float = 0.0

    def answer(self, status: int, headers: dict, body: bytes, path: str) -> tuple[int, dict, bytes]:
        """The answer as this fault changes it (the route's answer comes in)."""
        if self.location is not None:
            return 302, {"Location": self.location.replace("{path}", path), **self.headers}, b""
        if self.body is not None:
            status, headers, body = self.status or 200, {"Content-Type": "application/json"}, self.body
        headers = {k: v for k, v in headers.items() if k != "Content-Length"}
        return status, {**headers, **self.headers, "Content-Length": str(len(body))}, body


class LocalHub:
    """In-memory Hub API server on 127.0.0.1 (random port). ``token``: if set, writes need it."""

    def __init__(self, token: str | None = None, user: str = "user", host: str = "127.0.0.1", port: int = 0):
        self.token, self.user, self._address = token, user, (host, port)
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.lfs: dict[str, bytes] = {}  # uploaded LFS objects by sha256
        self.errors: list[str] = []  # tracebacks of server bugs
        self.requests: list[tuple[str, str]] = []  # (method, path) log, for tests
        self.authorizations: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.lock = threading.RLock()
        self.lies: dict[str, dict[str, str]] = {}  # repo_id -> {"sha": ..., "etag": ...} answered instead
        self.faults: list[Fault] = []
        self.stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    def start(self) -> "LocalHub":
        self._server = ThreadingHTTPServer(self._address, _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="LocalHub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- helpers used by handlers
    def repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(401, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def authorized(self, req, always: bool = False) -> bool:
        given = req.headers.get("Authorization", "")
        if self.token is None:
            return bool(given) or not always
        return given == f"Bearer {self.token}"

    def require_write(self, req) -> None:
        if self.token is not None and not self.authorized(req):
            raise HubError(401, "Invalid credentials in Authorization header")

    # ---- test hooks
    def tamper(self, repo_id: str, path: str, new_bytes: bytes, revision: str = "main", repo_type: str = "model"):
        """Replace the served bytes of ``path`` at ``revision`` keeping its recorded size/ETag/sha256."""
        with self.lock:
            commit = self.repo(repo_type, repo_id).resolve(revision)
            if path not in commit.files:
                raise KeyError(f"{path} not in {repo_id}@{revision}")
            commit.files[path] = replace(commit.files[path], data=bytes(new_bytes))

    def commit_sha(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str:
        with self.lock:
            return self.repo(repo_type, repo_id).resolve(revision).sha

    def lie(self, repo_id: str, sha: str | None = None, etag: str | None = None) -> None:
        """Answer ``sha`` as the commit of every revision of ``repo_id`` and ``etag`` as every file's ETag."""
        with self.lock:
            self.lies[repo_id] = {k: v for k, v in (("sha", sha), ("etag", etag)) if v}

    def fail(self, method: str, pattern: str, status: int | None = None, hang: float = 0.0, delay: float = 0.0,
             times: int | None = None, location: str | None = None, body: bytes | None = None,
             headers: dict | None = None, drip: float = 0.0) -> Fault:
        """Make requests ``method`` (e.g. "GET", "*") to paths matching ``pattern`` (re.search) misbehave."""
        fault = Fault(method, re.compile(pattern), status, hang, delay, times, location, body, headers or {}, drip)
        with self.lock:
            self.faults.append(fault)
        return fault

    def fault_for(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.method in ("*", method) and fault.pattern.search(path) and fault.times != 0:
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def put_files(self, repo_id: str, files: dict[str, bytes], lfs: tuple[str, ...] = LFS_SUFFIXES,
                  repo_type: str = "model") -> str:
        """Commit ``files`` to ``repo_id`` (created if missing) directly, without the client; returns the sha."""
        with self.lock:
            repo = self.repos.get((repo_type, repo_id))
            if repo is None:
                repo = self.repos[repo_type, repo_id] = _Repo(repo_type, repo_id, private=False)
            entries = dict(repo.head.files)
            entries.update({p: _Entry.make(data, lfs=p.endswith(lfs)) for p, data in files.items()})
            commit = repo.add_commit(repo.head.sha, entries, "put_files")
            repo.branches["main"] = commit.sha
            return commit.sha
