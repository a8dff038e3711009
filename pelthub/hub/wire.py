"""The GET under every pelthub read from a Hub (metadata, search pages, files): bounded in hops, time and bytes.

The client's own calls follow redirects and next-page links wherever they
point, check a download's deadline only between 1 MiB chunks and let a
broken gzip stream out as an httpx error. Here redirects are followed by
hand (at most `MAX_REDIRECTS` hops, each sent through the shared session, so
the request hook in client.py drops a token on any hop that leaves the
origin it was paired with); the deadline is checked after every read from
the socket, so a slow drip ends at it; and content is decoded here
(identity, gzip, deflate), so the byte cap counts decoded bytes, a gzip bomb
is cut off at the cap and a broken stream is a `HubIntegrityError`.
"""
from __future__ import annotations

import time
import zlib
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlsplit

from huggingface_hub import get_session

from ..errors import HubConnectionError, HubError, HubIntegrityError
from .limits import MAX_REDIRECTS, TIMEOUT_ENV

DEFAULT_PORTS = {"http": 80, "https": 443}
ACCEPT_ENCODING = "gzip, deflate"  # what `_Decoder` undoes (the session would offer br/zstd where installed)


def origin(url: Any) -> tuple[str, str, int | None]:
    """(scheme, host, port) of `url`: where a token may go is decided by this triple alone."""
    parts = urlsplit(str(url))
    scheme = parts.scheme.lower()
    try:
        port = parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is not a number: an origin no token is paired with
        port = None
    return scheme, (parts.hostname or "").lower(), port


def overdue(what: str, where: str, deadline_s: float) -> HubConnectionError:
    return HubConnectionError(f"cannot {what}: the Hub at {where} did not finish within {round(deadline_s, 1):g} s, "
                              f"the limit for this call; try again, or allow longer with timeout= or ${TIMEOUT_ENV}")


@contextmanager
def get(url: str, headers: dict[str, str], what: str, where: str, deadline: float, deadline_s: float,
        params: dict[str, Any] | None = None) -> Iterator[Any]:
    """The streamed answer to GET `url` after at most MAX_REDIRECTS redirects (query `params` on the first hop)."""
    session = get_session()
    headers = {**headers, "Accept-Encoding": ACCEPT_ENCODING}
    for _ in range(MAX_REDIRECTS + 1):
        if time.monotonic() > deadline:
            raise overdue(what, where, deadline_s)
        request = session.build_request("GET", url, params=params, headers=headers)
        response = session.send(request, stream=True, follow_redirects=False)
        if not response.has_redirect_location:
            try:
                yield response
            finally:
                response.close()
            return
        url, params = str(response.url.join(response.headers["Location"])), None
        response.close()
    raise HubError(f"cannot {what}: the Hub at {where} redirected it more than {MAX_REDIRECTS} times; check the "
                   "endpoint (endpoint=, HF_ENDPOINT)")


def body(response: Any, what: str, where: str, deadline: float, deadline_s: float,
         limit: int | None) -> Iterator[bytes]:
    """The decoded content of `response` as it arrives; past the deadline or `limit` bytes it raises instead."""
    decoder = _Decoder(response.headers.get("Content-Encoding"), what, where)
    size = 0
    for raw in response.iter_raw():
        if time.monotonic() > deadline:
            raise overdue(what, where, deadline_s)
        chunk = decoder.decode(raw, None if limit is None else limit - size)
        size += len(chunk)
        if limit is not None and size > limit:
            raise HubIntegrityError(f"cannot {what}: the Hub at {where} sent more than the {limit:,} bytes it "
                                    "records or pelthub takes for it; nothing was added")
        if chunk:
            yield chunk


class _Decoder:
    """Content-Encoding undone with zlib, never producing more than one byte past the room left."""

    def __init__(self, encoding: str | None, what: str, where: str):
        name = (encoding or "identity").strip().lower()
        wbits = {"identity": None, "gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
                 "deflate": zlib.MAX_WBITS}
        if name not in wbits:
            raise HubIntegrityError(f"cannot {what}: the Hub at {where} sent it as {name[:40]!r}; pelthub reads "
                                    "only identity, gzip and deflate content")
        self.inflate = None if wbits[name] is None else zlib.decompressobj(wbits[name])
        self.what, self.where, self.name = what, where, name

    def decode(self, data: bytes, room: int | None) -> bytes:
        if self.inflate is None:
            return data
        cap = 0 if room is None else max(room, 0) + 1  # 0: no cap
        try:
            out = self.inflate.decompress(data, cap)
            while self.inflate.unconsumed_tail and (not cap or len(out) < cap):
                out += self.inflate.decompress(self.inflate.unconsumed_tail, cap and cap - len(out))
        except zlib.error as e:
            raise HubIntegrityError(f"cannot {self.what}: the Hub at {self.where} sent a broken {self.name} stream "
                                    f"({str(e)[:80]}); try again, and check the endpoint if it persists") from None
        return out


__all__ = ["body", "get", "origin", "overdue"]
