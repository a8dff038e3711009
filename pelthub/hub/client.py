"""One place where pelthub talks to `huggingface_hub`: clients, verified downloads, error translation.

Every Hub call runs inside `translated(...)`, which turns the client's
exceptions (and the raw httpx / httpx2 errors some calls leak) into pelthub
`HubError`s whose message says what to do. Messages are scrubbed of tokens.

Every request made inside `translated(...)` is bounded by pelthub's
timeout (`limits.timeout_s`): a request hook fills in the time limit that
the client leaves open on most of its calls. The same hook keeps tokens in
scope: a token goes only to the origin it was paired with when the call
began (`token_for`: the stored token with the default Hub, a `token=` with
the endpoint given beside it), never along a redirect or next-page link to
another. Endpoints may carry credentials (`http://user:pass@host`); `public`
is the form that may appear in cards, logs and messages. Metadata is read
here, files in `fetch.py`, both through `wire.py`.
"""
from __future__ import annotations

import json
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import quote, urlsplit, urlunsplit

from huggingface_hub import HfApi, constants, get_session, get_token
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling
from huggingface_hub.utils import build_hf_headers, get_token_to_send, hf_raise_for_status
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

from ..errors import ConfigError, HubAuthError, HubConnectionError, HubError, HubIntegrityError, HubNotFoundError
from ..registry.card import HUB_ID_RE
from .limits import MAX_ANSWER_BYTES, TIMEOUT_ENV, call_limit_s, timeout_s
from .transport import http
from .wire import body, get, origin

COMMIT_RE = re.compile(r"^[0-9a-f]{40}\Z")
_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{8,}|(?<=Bearer )\S+")
_USERINFO_RE = re.compile(r"(?<=://)[^/\s@]+@")
PREFLIGHT_TIMEOUT_S = 5.0
ERROR_BODY_BYTES = 64 << 10  # of an error answer, read for its message
_ACTIVE: list["_Scope"] = []  # the pelthub Hub calls running now, in any thread
_ACTIVE_LOCK = threading.Lock()
_PENDING = threading.local()  # .started: when this thread's last request went out, None once it was answered


class Stalled(TimeoutError):
    """A request was about to be sent again after the previous one waited out its timeout (the client retries)."""


@dataclass(frozen=True)
class _Scope:
    """One running call: its time limit, when it began, and the one origin its token may go to."""

    limit: float
    start: float
    origin: tuple[str, str, int | None]
    token: str | None


def endpoint_of(endpoint: str | None) -> str:
    """The endpoint a call will use: the one given, else HF_ENDPOINT (huggingface.co by default)."""
    return (endpoint or constants.ENDPOINT).rstrip("/")


def public(url: str) -> str:
    """`url` without credentials (user:password@): what cards, logs and messages may show."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if "@" in parts.netloc else url


def check_repo_id(repo_id: Any) -> str:
    """`repo_id` if it reads as a Hub repo id ('user/name'); it goes into URLs, so nothing else is sent."""
    if not isinstance(repo_id, str) or not HUB_ID_RE.match(repo_id) or ".." in repo_id or len(repo_id) > 200:
        raise ConfigError(f"{_clip(repo_id)} is not a Hub repo id; write 'user/name' (letters, digits, '.', '_', "
                          "'-'), e.g. 'alice/sst2-lora'")
    return repo_id


def _clip(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def token_for(endpoint: str | None, token: str | None) -> str | None:
    """The token a call may send to `endpoint`, or None.

    A `token=` given with the call belongs to the endpoint given with it. The
    stored token (HF_TOKEN, `hf auth login`) was issued by the default Hub
    (HF_ENDPOINT, else huggingface.co) and goes to that origin only: naming
    another endpoint must not hand it the user's credentials.
    """
    if token:
        return token
    if origin(endpoint_of(endpoint)) != origin(constants.ENDPOINT):
        return None
    return get_token_to_send(None)


def api(endpoint: str | None = None, token: str | None = None) -> HfApi:
    return HfApi(endpoint=endpoint_of(endpoint), token=token_for(endpoint, token) or False)


def scrub(text: str, token: str | None = None) -> str:
    """`text` with the given token, the stored token and anything shaped like a Hub token replaced by ***."""
    for secret in {token, get_token()} - {None, ""}:
        text = text.replace(secret, "***")
    return _USERINFO_RE.sub("", _TOKEN_RE.sub("***", text))


def check_online(what: str) -> None:
    """Fail at once in offline mode, before the client does (some of its calls would retry first)."""
    if constants.HF_HUB_OFFLINE:
        raise HubConnectionError(f"cannot {what}: offline mode is on (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE "
                                 "to reach the Hub")


def preflight(endpoint: str | None, what: str, timeout: float | None = None) -> None:
    """One quick request to the endpoint, without retries.

    Some client calls (list_models, upload_folder) retry a refused connection
    with back-off for ~23 s; this turns an unreachable endpoint into an error
    within seconds instead. Any HTTP answer, even 404, counts as reachable.
    """
    check_online(what)
    url = endpoint_of(endpoint)
    limit = min(PREFLIGHT_TIMEOUT_S, timeout_s(timeout))
    try:
        get_session().head(url, timeout=limit)
    except (http.TransportError, OSError) as e:
        raise _unreachable(url, what, e, limit) from None


def _unreachable(url: str, what: str, error: BaseException, timeout: float | None = None) -> HubConnectionError:
    if isinstance(error, (http.TimeoutException, TimeoutError)):
        return too_slow(url, what, timeout)
    return HubConnectionError(f"cannot {what}: the Hub at {public(url)} is unreachable ({type(error).__name__}: "
                              f"{scrub(str(error))[:160]}); check the network and the endpoint (endpoint=, "
                              "HF_ENDPOINT), or work offline from the local registry")


def too_slow(url: str, what: str, timeout: float | None = None) -> HubConnectionError:
    return HubConnectionError(f"cannot {what}: the Hub at {public(url)} did not answer within {timeout_s(timeout):g} s; "
                              f"try again, or allow longer with timeout= or ${TIMEOUT_ENV}")


def _bound_request(request: http.Request) -> None:
    """Request hook: while a pelthub call runs, tokens stay in scope and no request waits longer than its timeout.

    A request to an origin no running call paired its token with loses its
    Authorization header (a Bearer token must be the very one paired with
    that origin; other schemes, from `user:pass@` in an endpoint, only go to
    that endpoint's origin). Redirect hops and next-page links pass here too.

    The client retries a timed-out request up to five times with back-off
    (~6x the timeout plus 23 s). So when a request this thread sent earlier
    in the call got no answer and more than the timeout (plus the client's
    first 1 s back-off, less a margin) has passed, the call stops instead; a
    refused connection, answered within milliseconds, is still retried.
    """
    with _ACTIVE_LOCK:
        scopes = list(_ACTIVE)
    if not scopes:
        return
    auth = request.headers.get("Authorization")
    if auth and not any(s.origin == origin(request.url) and (auth == f"Bearer {s.token}"
                                                              or not auth.lower().startswith("bearer "))
                        for s in scopes):
        del request.headers["Authorization"]
    limit, since = min(s.limit for s in scopes), min(s.start for s in scopes)
    now, started = time.monotonic(), getattr(_PENDING, "started", None)
    if started is not None and started >= since and now - started >= limit + 0.5:
        _PENDING.started = None
        raise Stalled(f"no answer within {limit:g} s")
    _PENDING.started = now
    given = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {k: limit if given.get(k) is None else min(given[k], limit)
                                     for k in ("connect", "read", "write", "pool")}


def _answered(response: http.Response) -> None:
    """Response hook: this thread's request got an answer (any status), so sending another is no retry of a stall."""
    _PENDING.started = None


@contextmanager
def bounded(timeout: float | None = None, endpoint: str | None = None, token: str | None = None) -> Iterator[float]:
    """Bound every request of the shared client by `timeout_s(timeout)` while inside (worker threads too).

    endpoint, token: the call's; its token (see `token_for`) may go to that endpoint's origin only.
    """
    limit = timeout_s(timeout)
    session = get_session()
    hooks = session.event_hooks
    if _bound_request not in hooks.get("request", []):
        session.event_hooks = {**hooks, "request": [*hooks.get("request", []), _bound_request],
                               "response": [*hooks.get("response", []), _answered]}
    scope = _Scope(limit, time.monotonic(), origin(endpoint_of(endpoint)), token_for(endpoint, token))
    with _ACTIVE_LOCK:
        _ACTIVE.append(scope)
    try:
        yield limit
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.remove(scope)


@contextmanager
def translated(what: str, repo_id: str | None = None, revision: str | None = None, endpoint: str | None = None,
               token: str | None = None, timeout: float | None = None) -> Iterator[None]:
    """Bound the requests made inside (see `bounded`) and turn their errors into HubErrors that name the fix."""
    url = endpoint_of(endpoint)
    where = f"{repo_id!r} on {public(url)}" if repo_id else public(url)
    try:
        with bounded(timeout, endpoint, token):
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
                               f"{'this token cannot see it' if token_for(endpoint, token) else 'no token was sent'}"
                               f"; check the repo id, or pass a token ({_token_hint(endpoint)})") from None
    except RevisionNotFoundError:
        raise HubNotFoundError(f"cannot {what}: {where} has no revision {revision!r}; pass a branch, tag or "
                               "commit sha that exists (leave revision out for the default branch)") from None
    except LocalEntryNotFoundError as e:  # what snapshot/hf_hub_download raise when the connection failed
        raise _unreachable(url, what, e.__cause__ or e, timeout) from None
    except EntryNotFoundError as e:
        raise HubNotFoundError(f"cannot {what}: a file is missing from {where} at {revision or 'main'}: "
                               f"{scrub(str(e), token).splitlines()[0][:200]}") from None
    except HfHubHTTPError as e:
        raise _http_error(e, what, where, endpoint, token) from None
    except http.TooManyRedirects:
        raise HubError(f"cannot {what}: the Hub at {public(url)} redirected it too many times; check the endpoint "
                       "(endpoint=, HF_ENDPOINT)") from None
    except http.DecodingError as e:
        raise HubIntegrityError(f"cannot {what}: the Hub at {public(url)} sent content that does not decode "
                                f"({scrub(str(e), token)[:120]}); try again, and check the endpoint if it "
                                "persists") from None
    except (http.TransportError, ConnectionError, TimeoutError) as e:
        raise _unreachable(url, what, e, timeout) from None


def _token_hint(endpoint: str | None) -> str:
    """Where a token for `endpoint` comes from: the stored one serves the default Hub only."""
    if origin(endpoint_of(endpoint)) == origin(constants.ENDPOINT):
        return "token=, HF_TOKEN or `hf auth login`"
    return (f"token= with this endpoint; the stored token (HF_TOKEN, `hf auth login`) goes only to "
            f"{public(constants.ENDPOINT)}, or to HF_ENDPOINT when that names this Hub")


def _http_error(e: HfHubHTTPError, what: str, where: str, endpoint: str | None, token: str | None) -> HubError:
    status = e.response.status_code if e.response is not None else None
    detail = scrub(str(e), token).splitlines()[0][:200] if str(e) else ""
    if status == 401:
        fix = ("the token was refused: check it, or log in again (`hf auth login`)" if token_for(endpoint, token)
               else f"no token found for this endpoint: pass one ({_token_hint(endpoint)})")
        return HubAuthError(f"cannot {what}: {where} needs authentication; {fix} ({detail})")
    if status == 403:
        return HubAuthError(f"cannot {what}: the token may not do this on {where}; use a token with write access "
                            f"to that namespace ({detail})")
    if status == 409:
        return HubError(f"cannot {what}: {where} already has it ({detail}); pick another tag or branch name")
    return HubError(f"cannot {what}: the Hub answered {status} for {where} ({detail})")


def get_json(url: str, what: str, endpoint: str | None, token: str | None, deadline: float, deadline_s: float,
             params: dict[str, Any] | None = None) -> tuple[Any, dict[str, dict[str, str]]]:
    """(parsed JSON, its Link header by rel) of GET `url`, at most MAX_ANSWER_BYTES; run it inside `translated`.

    An error status raises the client's own HTTP error (read from the first
    ERROR_BODY_BYTES of the answer), which `translated` turns into a HubError.
    """
    where = public(endpoint_of(endpoint))
    headers = build_hf_headers(token=token_for(endpoint, token) or False)
    with get(url, headers, what, where, deadline, deadline_s, params) as response:
        if response.status_code >= 300:
            content = b"".join(_first(body(response, what, where, deadline, deadline_s, None), ERROR_BODY_BYTES))
            hf_raise_for_status(http.Response(response.status_code, headers=response.headers, content=content,
                                              request=response.request))
            raise HubError(f"cannot {what}: the Hub at {where} answered {response.status_code}")
        content = b"".join(body(response, what, where, deadline, deadline_s, MAX_ANSWER_BYTES))
        links = response.links
    try:
        return json.loads(content), links
    except (ValueError, RecursionError):
        raise HubError(f"cannot {what}: the Hub at {where} answered something that is not JSON (or nested too "
                       "deep); check the endpoint (endpoint=, HF_ENDPOINT)") from None


def _first(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    size = 0
    for chunk in chunks:
        yield chunk[:limit - size]
        size += len(chunk)
        if size >= limit:
            return


def resolve(repo_id: str, revision: str | None, endpoint: str | None, token: str | None,
            timeout: float | None = None) -> tuple[str, dict]:
    """(commit sha, {file: sibling metadata}) of a revision, in one GET that does not retry.

    The sha becomes part of cards and URLs, so it must be 40 lower-case hex
    digits, and the very commit asked for when `revision` is a commit sha.
    The whole call (redirects, every read) ends within `limits.call_limit_s`.
    """
    check_repo_id(repo_id)
    check_online(f"resolve {repo_id}")
    url = endpoint_of(endpoint)
    what = f"read {repo_id}"
    path = f"{url}/api/models/{repo_id}" + (f"/revision/{quote(revision, safe='')}" if revision else "")
    with translated(what, repo_id, revision, endpoint, token, timeout):
        limit_s = call_limit_s(timeout)
        info, _ = get_json(path, what, endpoint, token, time.monotonic() + limit_s, limit_s, {"blobs": "true"})
    sha = info.get("sha") if isinstance(info, dict) else None
    if not (isinstance(sha, str) and COMMIT_RE.match(sha)) or (revision and COMMIT_RE.match(revision)
                                                               and sha != revision):
        raise HubIntegrityError(f"the Hub at {public(url)} answered commit {_clip(sha)} for "
                                f"{repo_id}@{revision or 'main'}, which is not "
                                f"{'that commit' if revision and COMMIT_RE.match(revision) else 'a commit sha'} "
                                "(40 hex digits); nothing was downloaded. Check the endpoint (endpoint=, "
                                "HF_ENDPOINT): it is not a Hub that can be trusted")
    siblings = info.get("siblings") or []
    if not (isinstance(siblings, list) and all(isinstance(s, dict) for s in siblings)):
        raise _malformed(url, repo_id, "'siblings' is not a list of file records")
    return sha, {f["rfilename"]: _sibling(url, repo_id, f) for f in siblings if isinstance(f.get("rfilename"), str)}


def _sibling(url: str, repo_id: str, record: dict) -> RepoSibling:
    """The Hub's record of one file, its types checked: sizes whole numbers, hashes strings."""
    lfs, size, blob = record.get("lfs"), record.get("size"), record.get("blobId")
    if not (_count(size) or size is None) or not (isinstance(blob, str) or blob is None):
        raise _malformed(url, repo_id, f"the record of {_clip(record['rfilename'])} has a wrong-typed size or blobId")
    if lfs is None:
        return RepoSibling(record["rfilename"], size, blob)
    if not (isinstance(lfs, dict) and _count(lfs.get("size")) and isinstance(lfs.get("sha256"), str)):
        raise _malformed(url, repo_id, f"the LFS record of {_clip(record['rfilename'])} is not {{size, sha256}}")
    return RepoSibling(record["rfilename"], size, blob,
                       BlobLfsInfo(lfs["size"], lfs["sha256"], lfs.get("pointerSize") or 0))


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _malformed(url: str, repo_id: str, problem: str) -> HubError:
    return HubError(f"cannot read {repo_id}: the Hub at {public(url)} answered malformed metadata ({problem}); "
                    "nothing was downloaded. Check the endpoint (endpoint=, HF_ENDPOINT)")
