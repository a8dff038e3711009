"""Downloading files of one Hub commit into a folder pelthub chose, with every byte accounted for.

pelthub does not let the client pick where bytes land: its cache derives
paths from what the server answers (commit sha, ETag), so a hostile server
could name a path outside the cache. Here each file is streamed to
`directory/<name>`, where `name` is a plain file name checked first and the
commit a checked 40-hex sha; no more bytes are taken than the Hub's record
of the file (or the cap) allows; and each file is hashed and compared with
that record (sha256 for LFS files, the git blob id for the others) before
anyone reads it. The hash is taken while the bytes stream to disk, so a
pull holds at most one chunk of a file in memory; the whole download ends
within `limits.download_limit_s` however slowly the bytes drip (see
wire.py). 5xx answers and refused connections are tried again a few times
with back-off; 4xx answers once.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

from huggingface_hub.utils import build_hf_headers

from ..errors import HubAuthError, HubConnectionError, HubError, HubIntegrityError, HubNotFoundError
from .client import COMMIT_RE, bounded, check_online, check_repo_id, endpoint_of, public, scrub, token_for, too_slow
from .limits import ATTEMPTS, BACKOFF_S, download_limit_s
from .transport import http
from .wire import body, get

PLAIN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}\Z")
CHUNK = 1 << 20  # read back from disk when the Hub records no size for a git blob


@dataclass(frozen=True)
class Snapshot:
    """Files of one commit, downloaded and checked against the Hub's metadata."""

    repo_id: str
    commit: str
    endpoint: str  # public form: no credentials
    directory: Path
    files: tuple[str, ...]


def download(repo_id: str, commit: str, siblings: dict, files: Sequence[str], directory: Path,
             endpoint: str | None = None, token: str | None = None, timeout: float | None = None,
             max_bytes: dict[str, int] | None = None) -> Snapshot:
    """Download `files` of `commit` into `directory` (flat) and verify each against the Hub's record of it.

    max_bytes: a cap per file name, checked against the Hub's record before
    the download and against the bytes while they arrive.
    """
    check_repo_id(repo_id)
    if not COMMIT_RE.match(commit):
        raise HubIntegrityError(f"refusing to download {repo_id} at {commit[:50]!r}: not a commit sha")
    bad = [f for f in files if not (isinstance(f, str) and PLAIN_NAME_RE.match(f) and ".." not in f)]
    if bad:
        raise HubIntegrityError(f"refusing to download {bad[0]!r} from {repo_id}: only plain file names (letters, "
                                "digits, '.', '_', '-'; no '/', no '..') are fetched")
    missing = [f for f in files if f not in siblings]
    if missing:
        raise HubNotFoundError(f"{repo_id} at {commit[:12]} has no {', '.join(missing)}; it holds "
                               f"{', '.join(sorted(siblings)) or 'nothing'}")
    url = endpoint_of(endpoint)
    check_online(f"download {repo_id}")
    directory.mkdir(parents=True, exist_ok=True)
    for name in files:
        expected = _recorded_size(siblings[name])
        cap = (max_bytes or {}).get(name)
        if cap is not None and expected is not None and expected > cap:
            raise HubError(f"{name} of {repo_id}@{commit[:12]} is {expected:,} bytes; pelthub takes at most "
                           f"{cap:,} for it, so it was not downloaded (see README, Security model, to raise it)")
        limit = expected if expected is not None else cap
        target = f"{url}/{quote(repo_id)}/resolve/{commit}/{quote(name)}"
        _fetch(target, directory / name, limit, siblings[name], repo_id, endpoint, token, timeout)
    return Snapshot(repo_id, commit, public(url), directory, tuple(files))


def _recorded_size(sibling: Any) -> int | None:
    lfs = getattr(sibling, "lfs", None)
    size = getattr(lfs, "size", None) if lfs is not None else getattr(sibling, "size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None


def _fetch(url: str, dest: Path, limit: int | None, sibling: Any, repo_id: str, endpoint: str | None,
           token: str | None, timeout: float | None) -> None:
    """GET `url` into a new file `dest` (at most `limit` bytes), hashed on the way; a few tries on 5xx."""
    what = f"download {dest.name} of {repo_id}"
    for attempt in range(ATTEMPTS):
        try:
            with bounded(timeout, endpoint, token):
                digest = _Digest(sibling)
                _stream(url, dest, limit, digest, what, endpoint, token, timeout)
            digest.check(repo_id, dest)
            return
        except _Retry as e:
            if dest.exists():
                dest.unlink()
            if attempt == ATTEMPTS - 1:
                raise e.error from None
            time.sleep(BACKOFF_S * 2 ** attempt)
        except BaseException:
            if dest.exists():
                dest.unlink()
            raise


class _Retry(Exception):
    def __init__(self, error: HubError):
        super().__init__(str(error))
        self.error = error


class _Digest:
    """The Hub's hash of one file, taken over the bytes as they arrive: sha256 for LFS files, else the git blob id.

    The blob id hashes a header holding the size before the bytes; when the
    Hub records no size, the file is read back from disk in chunks instead.
    """

    def __init__(self, sibling: Any):
        lfs = getattr(sibling, "lfs", None)
        self.size, self.received = _recorded_size(sibling), 0
        if lfs is not None:
            self.kind, self.expected, self.hash = "sha256", lfs.sha256, hashlib.sha256()
        else:
            self.kind, self.expected, self.hash = "git blob id", getattr(sibling, "blob_id", None), hashlib.sha1()
        self.streaming = lfs is not None or self.size is not None
        if self.streaming and lfs is None:
            self.hash.update(b"blob %d\0" % self.size)

    def update(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.streaming:
            self.hash.update(chunk)

    def check(self, repo_id: str, path: Path) -> None:
        """Raise HubIntegrityError naming the file when its bytes are not the ones the Hub records."""
        if not self.expected:
            return
        if not self.streaming:
            self.hash.update(b"blob %d\0" % self.received)
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    self.hash.update(chunk)
        actual = self.hash.hexdigest()
        if actual != self.expected or self.size not in (None, self.received):
            raise HubIntegrityError(f"{path.name} downloaded from {repo_id} has {self.kind} {actual[:16]}... but "
                                    f"the Hub records {self.expected[:16]}...: the download is damaged or was "
                                    "tampered with; nothing was added. Try again; if it persists, tell the repo "
                                    "owner")


def _stream(url: str, dest: Path, limit: int | None, digest: _Digest, what: str, endpoint: str | None,
            token: str | None, timeout: float | None) -> None:
    where = public(endpoint_of(endpoint))
    deadline_s = download_limit_s(timeout, limit)
    deadline = time.monotonic() + deadline_s
    headers = build_hf_headers(token=token_for(endpoint, token) or False)
    try:
        with get(url, headers, what, where, deadline, deadline_s) as response:
            status = response.status_code
            if status >= 300:
                error = _status_error(status, what, where, token, response)
                raise _Retry(error) if status >= 500 else error
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as out:
                for chunk in body(response, what, where, deadline, deadline_s, limit):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
    except http.TimeoutException:
        raise too_slow(endpoint_of(endpoint), what, timeout) from None
    except (http.ConnectError, http.RemoteProtocolError) as e:
        raise _Retry(HubConnectionError(f"cannot {what}: the Hub at {where} is unreachable "
                                        f"({type(e).__name__}: {scrub(str(e), token)[:160]}); check the network "
                                        "and the endpoint (endpoint=, HF_ENDPOINT)")) from None
    except http.HTTPError as e:
        raise HubConnectionError(f"cannot {what}: the connection to {where} failed "
                                 f"({type(e).__name__}: {scrub(str(e), token)[:160]}); try again") from None


def _status_error(status: int, what: str, where: str, token: str | None, response: Any) -> HubError:
    message = scrub(response.headers.get("X-Error-Message", ""), token)[:160]
    detail = f" ({message})" if message else ""
    if status in (401, 403):
        return HubAuthError(f"cannot {what}: the Hub at {where} refused it ({status}){detail}; the repo may be "
                            "private or gated: pass a token that may read it (token=, HF_TOKEN or `hf auth login`)")
    if status == 404:
        return HubNotFoundError(f"cannot {what}: the Hub at {where} has no such file (404){detail}; check the repo "
                                "id and revision")
    if status >= 500:
        return HubError(f"cannot {what}: the Hub at {where} failed ({status}){detail} after {ATTEMPTS} tries; try "
                        "again later")
    return HubError(f"cannot {what}: the Hub at {where} answered {status}{detail}")
