"""Downloading files of one Hub commit into a folder pelthub chose, with every byte accounted for.

pelthub does not let the client pick where bytes land: its cache derives
paths from what the server answers (commit sha, ETag), so a hostile server
could name a path outside the cache. Here each file is streamed to
`directory/<name>`, where `name` is a plain file name checked first and the
commit a checked 40-hex sha; no more bytes are taken than the Hub's record
of the file (or the cap) allows; and each file is hashed and compared with
that record (sha256 for LFS files, the git blob id for the others) before
anyone reads it. 5xx answers and refused connections are tried again a few
times with back-off; 4xx answers once.
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

from huggingface_hub import get_session
from huggingface_hub.utils import build_hf_headers

from ..errors import HubAuthError, HubConnectionError, HubError, HubIntegrityError, HubNotFoundError
from .client import COMMIT_RE, bounded, check_online, check_repo_id, endpoint_of, public, scrub, too_slow
from .limits import ATTEMPTS, BACKOFF_S
from .transport import http

PLAIN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}\Z")
CHUNK = 1 << 20


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
        _fetch(target, directory / name, limit, f"download {name} of {repo_id}", url, token, timeout)
        _check_against_hub(repo_id, name, directory / name, siblings[name])
    return Snapshot(repo_id, commit, public(url), directory, tuple(files))


def _recorded_size(sibling: Any) -> int | None:
    lfs = getattr(sibling, "lfs", None)
    size = getattr(lfs, "size", None) if lfs is not None else getattr(sibling, "size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None


def _fetch(url: str, dest: Path, limit: int | None, what: str, endpoint: str, token: str | None,
           timeout: float | None) -> None:
    """GET `url` into a new file `dest`, at most `limit` bytes; a few tries on 5xx or a refused connection."""
    for attempt in range(ATTEMPTS):
        try:
            with bounded(timeout) as limit_s:
                deadline = time.monotonic() + limit_s * (10 + (limit or 0) / CHUNK)
                _stream(url, dest, limit, what, endpoint, token, limit_s, deadline)
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


def _stream(url: str, dest: Path, limit: int | None, what: str, endpoint: str, token: str | None,
            timeout: float, deadline: float) -> None:
    headers = build_hf_headers(token=token)
    try:
        with get_session().stream("GET", url, headers=headers, follow_redirects=True) as response:
            status = response.status_code
            if status >= 400:
                error = _status_error(status, what, endpoint, token, response)
                raise _Retry(error) if status >= 500 else error
            size = 0
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as out:
                for chunk in response.iter_bytes(CHUNK):
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise HubIntegrityError(f"cannot {what}: the Hub at {public(endpoint)} sent more than the "
                                                f"{limit:,} bytes it records for it; nothing was added")
                    if time.monotonic() > deadline:
                        raise too_slow(endpoint, what, timeout)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
    except http.TimeoutException:
        raise too_slow(endpoint, what, timeout) from None
    except (http.ConnectError, http.RemoteProtocolError) as e:
        raise _Retry(HubConnectionError(f"cannot {what}: the Hub at {public(endpoint)} is unreachable "
                                        f"({type(e).__name__}: {scrub(str(e), token)[:160]}); check the network "
                                        "and the endpoint (endpoint=, HF_ENDPOINT)")) from None
    except http.TransportError as e:
        raise HubConnectionError(f"cannot {what}: the connection to {public(endpoint)} failed "
                                 f"({type(e).__name__}: {scrub(str(e), token)[:160]}); try again") from None


def _status_error(status: int, what: str, endpoint: str, token: str | None, response: Any) -> HubError:
    message = scrub(response.headers.get("X-Error-Message", ""), token)[:160]
    detail = f" ({message})" if message else ""
    where = public(endpoint)
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


def _check_against_hub(repo_id: str, name: str, path: Path, sibling: object) -> None:
    data = path.read_bytes()
    lfs = getattr(sibling, "lfs", None)
    if lfs is not None:
        expected, actual, kind = lfs.sha256, hashlib.sha256(data).hexdigest(), "sha256"
    else:
        expected, kind = getattr(sibling, "blob_id", None), "git blob id"
        actual = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    if expected and expected != actual:
        raise HubIntegrityError(f"{name} downloaded from {repo_id} has {kind} {actual[:16]}... but the Hub records "
                                f"{expected[:16]}...: the download is damaged or was tampered with; nothing was "
                                "added. Try again; if it persists, tell the repo owner")
