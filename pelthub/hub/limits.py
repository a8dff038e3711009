"""How long pelthub waits for a Hub and how much it takes from one; every limit can be raised.

A Hub endpoint is input like any other: it may be slow, never answer, or
serve a 100 MB model card or a chain of 400 parents. These limits turn each
of those into a prompt error that names the limit and how to raise it (a
keyword argument of the call, or the environment variable named here).
"""
from __future__ import annotations

import math
import os

from ..errors import ConfigError

TIMEOUT_ENV = "PELTHUB_HUB_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0          # per request: connect, and each wait for the next bytes
MAX_CARD_BYTES_ENV = "PELTHUB_MAX_CARD_BYTES"
DEFAULT_MAX_CARD_BYTES = 1 << 20  # README.md (the card and its YAML front matter)
MAX_DEPTH_ENV = "PELTHUB_MAX_DEPTH"
DEFAULT_MAX_DEPTH = 32            # parent of a parent of ... of the module pulled
MAX_PARENTS_ENV = "PELTHUB_MAX_PARENTS"
DEFAULT_MAX_PARENTS = 100         # modules one pull fetches besides the one asked for
MAX_SEARCH_PAGES_ENV = "PELTHUB_MAX_SEARCH_PAGES"
DEFAULT_MAX_SEARCH_PAGES = 100    # pages of results one search follows (the Hub serves up to 1,000 per page)
MAX_MODULE_BYTES_ENV = "PELTHUB_MAX_MODULE_BYTES"
DEFAULT_MAX_MODULE_BYTES = 16 << 30  # all files a pulled card declares, together
MAX_CARD_FILES = 64               # files a pulled card may declare (pelthub writes two)
MAX_ANSWER_BYTES = 32 << 20       # one metadata answer or one page of search results (JSON)
MAX_REDIRECTS = 5                 # hops one request may be redirected
CALL_SPAN = 10                    # a metadata or search call in all: at most timeout x CALL_SPAN seconds
ATTEMPTS = 3                      # tries of a download on a 5xx answer or a refused connection; 4xx: one
BACKOFF_S = 0.5                   # wait before the second try; doubles after each


def timeout_s(timeout: float | None = None) -> float:
    """Seconds a Hub request may wait: `timeout`, else $PELTHUB_HUB_TIMEOUT, else 30."""
    value = _setting(timeout, TIMEOUT_ENV, DEFAULT_TIMEOUT_S, "timeout")
    return float(value)


def max_card_bytes() -> int:
    return int(_setting(None, MAX_CARD_BYTES_ENV, DEFAULT_MAX_CARD_BYTES, "max card bytes", integer=True))


def call_limit_s(timeout: float | None = None) -> float:
    """Seconds one metadata or search call may take in all (every page, hop and read): timeout x CALL_SPAN."""
    return timeout_s(timeout) * CALL_SPAN


def download_limit_s(timeout: float | None, size: int | None) -> float:
    """Seconds one file download may take in all: timeout x (CALL_SPAN + size in MiB); a slow drip ends there."""
    return timeout_s(timeout) * (CALL_SPAN + (size or 0) / (1 << 20))


def max_search_pages(value: int | None = None) -> int:
    return int(_setting(value, MAX_SEARCH_PAGES_ENV, DEFAULT_MAX_SEARCH_PAGES, "max_pages", integer=True))


def max_module_bytes() -> int:
    return int(_setting(None, MAX_MODULE_BYTES_ENV, DEFAULT_MAX_MODULE_BYTES, "max module bytes", integer=True))


def max_depth(value: int | None = None) -> int:
    return int(_setting(value, MAX_DEPTH_ENV, DEFAULT_MAX_DEPTH, "max_depth", integer=True))


def max_parents(value: int | None = None) -> int:
    return int(_setting(value, MAX_PARENTS_ENV, DEFAULT_MAX_PARENTS, "max_parents", integer=True))


def _setting(value: float | int | None, env: str, default: float | int, what: str, integer: bool = False) -> float:
    source = f"{what}=" if value is not None else f"${env}"
    raw = value if value is not None else os.environ.get(env) or default
    try:
        number = float(raw) if not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0 and (not integer or number == int(number))):
        kind = "a positive whole number" if integer else "a positive number of seconds"
        raise ConfigError(f"{source} must be {kind}, got {raw!r}")
    return number
