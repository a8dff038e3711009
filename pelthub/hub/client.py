"""One place where pelthub talks to `huggingface_hub`: clients, verified downloads, error translation.

Every Hub call runs inside `translated(...)`, which turns the client's
exceptions (and the raw `httpx2` errors some calls leak) into pelthub
`HubError`s whose message says what to do. Messages are scrubbed of tokens.

The client never checks what it downloads against the sha256 the Hub
records, so `download` does: every file is hashed and compared with the
commit's metadata (sha256 for LFS files, the git blob id for the others).
"""
from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from huggingface_hub import HfApi, constants, get_session, get_token, hf_hub_download
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

from .transport import TransportError
from ..errors import HubAuthError, HubConnectionError, HubError, HubIntegrityError, HubNotFoundError

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{8,}|(?<=Bearer )\S+")
PREFLIGHT_TIMEOUT_S = 5.0


def endpoint_of(endpoint: str | None) -> str:
    """The endpoint a call will use: the one given, else HF_ENDPOINT (huggingface.co by default)."""
    return (endpoint or constants.ENDPOINT).rstrip("/")


def api(endpoint: str | None = None, token: str | None = None) -> HfApi:
    return HfApi(endpoint=endpoint_of(endpoint), token=token)


def scrub(text: str, token: str | None = None) -> str:
    """`text` with the given token, the stored token and anything shaped like a Hub token replaced by ***."""
    for secret in {token, get_token()} - {None, ""}:
        text = text.replace(secret, "***")
    return _TOKEN_RE.sub("***", text)


def check_online(what: str) -> None:
    """Fail at once in offline mode, before the client does (some of its calls would retry first)."""
    if constants.HF_HUB_OFFLINE:
        raise HubConnectionError(f"cannot {what}: offline mode is on (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE "
                                 "to reach the Hub")


def preflight(endpoint: str | None, what: str) -> None:
    """One quick request to the endpoint, without retries.

    Some client calls (list_models, upload_folder) retry a refused connection
    with back-off for ~23 s; this turns an unreachable endpoint into an error
    within seconds instead. Any HTTP answer, even 404, counts as reachable.
    """
    check_online(what)
    url = endpoint_of(endpoint)
    try:
        get_session().head(url, timeout=PREFLIGHT_TIMEOUT_S)
    except (TransportError, OSError) as e:
        raise _unreachable(url, what, e) from None


def _unreachable(url: str, what: str, error: BaseException) -> HubConnectionError:
    return HubConnectionError(f"cannot {what}: the Hub at {url} is unreachable ({type(error).__name__}: "
                              f"{scrub(str(error))[:160]}); check the network and the endpoint (endpoint=, "
                              "HF_ENDPOINT), or work offline from the local registry")


@contextmanager
def translated(what: str, repo_id: str | None = None, revision: str | None = None, endpoint: str | None = None,
               token: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub and httpx2 errors raised inside into HubErrors that name the fix."""
    url = endpoint_of(endpoint)
    where = f"{repo_id!r} on {url}" if repo_id else url
    try:
        yield
    except HubError:
        raise
    except OfflineModeIsEnabled:
        raise HubConnectionError(f"cannot {what}: offline mode is on (HF_HUB_OFFLINE=1); unset it to reach "
                                 "the Hub") from None
    except GatedRepoError:
        raise HubAuthError(f"cannot {what}: {where} is gated; accept its conditions on the Hub and pass a token "
                           "(token=, HF_TOKEN or `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise HubNotFoundError(f"cannot {what}: no repo {where}, or it is private and "
                               f"{'this token cannot see it' if token or get_token() else 'no token was given'}; "
                               "check the repo id, or pass a token (token=, HF_TOKEN or `hf auth login`)") from None
    except RevisionNotFoundError:
        raise HubNotFoundError(f"cannot {what}: {where} has no revision {revision!r}; pass a branch, tag or "
                               "commit sha that exists (leave revision out for the default branch)") from None
    except LocalEntryNotFoundError as e:  # what snapshot/hf_hub_download raise when the connection failed
        raise _unreachable(url, what, e) from None
    except EntryNotFoundError as e:
        raise HubNotFoundError(f"cannot {what}: a file is missing from {where} at {revision or 'main'}: "
                               f"{scrub(str(e), token).splitlines()[0][:200]}") from None
    except HfHubHTTPError as e:
        raise _http_error(e, what, where, token) from None
    except (TransportError, ConnectionError) as e:
        raise _unreachable(url, what, e) from None


def _http_error(e: HfHubHTTPError, what: str, where: str, token: str | None) -> HubError:
    status = e.response.status_code if e.response is not None else None
    detail = scrub(str(e), token).splitlines()[0][:200]
    if status == 401:
        fix = ("the token was refused: check it, or log in again (`hf auth login`)" if token or get_token()
               else "no token found: pass token=, set HF_TOKEN or run `hf auth login`")
        return HubAuthError(f"cannot {what}: {where} needs authentication; {fix} ({detail})")
    if status == 403:
        return HubAuthError(f"cannot {what}: the token may not do this on {where}; use a token with write access "
                            f"to that namespace ({detail})")
    if status == 409:
        return HubError(f"cannot {what}: {where} already has it ({detail}); pick another tag or branch name")
    return HubError(f"cannot {what}: the Hub answered {status} for {where} ({detail})")


@dataclass(frozen=True)
class Snapshot:
    """Files of one commit, downloaded and checked against the Hub's metadata."""

    repo_id: str
    commit: str
    endpoint: str
    directory: Path
    files: tuple[str, ...]


def resolve(repo_id: str, revision: str | None, endpoint: str | None, token: str | None) -> tuple[str, dict]:
    """(commit sha, {file: sibling metadata}) of a revision, in one call that does not retry."""
    check_online(f"resolve {repo_id}")
    with translated(f"read {repo_id}", repo_id, revision, endpoint, token):
        info = api(endpoint, token).model_info(repo_id, revision=revision, files_metadata=True)
    return info.sha, {s.rfilename: s for s in info.siblings or []}


def download(repo_id: str, commit: str, siblings: dict, files: Sequence[str], directory: Path,
             endpoint: str | None = None, token: str | None = None) -> Snapshot:
    """Download `files` of `commit` under `directory` and verify each against the Hub's record of it."""
    missing = [f for f in files if f not in siblings]
    if missing:
        raise HubNotFoundError(f"{repo_id} at {commit[:12]} has no {', '.join(missing)}; it holds "
                               f"{', '.join(sorted(siblings)) or 'nothing'}")
    paths = {}
    with translated(f"download {repo_id}", repo_id, commit, endpoint, token):
        for name in files:
            paths[name] = Path(hf_hub_download(repo_id, name, revision=commit, cache_dir=directory,
                                               endpoint=endpoint_of(endpoint), token=token))
    for name, path in paths.items():
        _check_against_hub(repo_id, name, path, siblings[name])
    folder = paths[files[0]].parent if files else directory
    return Snapshot(repo_id, commit, endpoint_of(endpoint), folder, tuple(files))


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
