"""Find pelthub modules on the Hub by base model, kind, task and author (the Hub's model listing filters).

Pushed cards tag every repo with `pelthub`, each kind, the task and
`base_model:adapter:<base id>`, so each filter is one Hub tag and the Hub
does the filtering; the results carry what the cards say.

The listing is read here, not through `HfApi.list_models`, which follows
next-page links to any host (with the token) and for ever: pages are
followed on the endpoint's own origin only, at most `max_pages` of them,
and the whole search ends within `limits.call_limit_s`. An answer of the
wrong shape is a HubError; a card field of the wrong type in one result
(any repo owner can write one) reads as absent, so one bad repo cannot
break every search.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError, HubError
from ..registry.card import HUB_ID_RE, LIBRARY
from .client import endpoint_of, get_json, preflight, public, translated
from .limits import MAX_SEARCH_PAGES_ENV, call_limit_s, max_search_pages
from .wire import origin

PAGE_SIZE = 1000  # results the Hub serves per page at most


@dataclass(frozen=True)
class HubModule:
    """One module repo found on the Hub. `kinds`, `task` and `base_model` come from its card."""

    repo_id: str
    kinds: list[str]
    task: str | None
    base_model: str | None
    tags: list[str]
    last_modified: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def search(base_model: nn.Module | str | None = None, kind: str | None = None, task: str | None = None,
           author: str | None = None, endpoint: str | None = None, token: str | None = None,
           limit: int | None = 100, timeout: float | None = None, max_pages: int | None = None) -> list[HubModule]:
    """pelthub modules on the Hub matching every filter given, as `HubModule`s.

    base_model: a Hub model id, or a model whose `config.name_or_path` is one.
    max_pages: pages of results to follow at most ($PELTHUB_MAX_SEARCH_PAGES, 100).
    """
    filters = [LIBRARY, *([kind] if kind else []), *([task] if task else [])]
    base = _base_id(base_model)
    if base:
        filters.append(f"base_model:adapter:{base}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"limit must be a positive number of results (or None for all), got {limit!r}")
    pages = max_search_pages(max_pages)
    preflight(endpoint, "search the Hub", timeout)
    url = endpoint_of(endpoint)
    params: dict[str, Any] | None = {"filter": filters, "cardData": "true", **({"author": author} if author else {}),
                                     **({"limit": min(limit, PAGE_SIZE)} if limit else {})}
    found: list[HubModule] = []
    with translated("search the Hub", endpoint=endpoint, token=token, timeout=timeout):
        limit_s = call_limit_s(timeout)
        deadline = time.monotonic() + limit_s
        page_url: str | None = f"{url}/api/models"
        for _ in range(pages):
            page, links = get_json(page_url, "search the Hub", endpoint, token, deadline, limit_s, params)
            if not isinstance(page, list):
                raise _malformed(url, f"a page is {type(page).__name__}, not a list of models")
            found += (_result(url, info) for info in page)
            page_url, params = _next_page(url, links), None
            if page_url is None or limit is not None and len(found) >= limit:
                return found[:limit]
    raise HubError(f"cannot search the Hub: {public(url)} still had more results after {pages} pages; narrow the "
                   f"search (base_model=, kind=, task=, author=, limit=) or allow more pages with max_pages= or "
                   f"${MAX_SEARCH_PAGES_ENV}")


def _next_page(url: str, links: dict[str, dict[str, str]]) -> str | None:
    """The next page's URL from the Link header; it must be on the endpoint's own origin."""
    link = links.get("next", {}).get("url")
    if link is None:
        return None
    if origin(link) != origin(url):
        raise HubError(f"cannot search the Hub: {public(url)} pointed to its next page on another host "
                       f"({public(link)[:80]}); pelthub follows pages on the endpoint's own host only. Check the "
                       "endpoint (endpoint=, HF_ENDPOINT)")
    return link


def _base_id(base_model: nn.Module | str | None) -> str | None:
    if base_model is None or isinstance(base_model, str):
        return base_model or None
    config = getattr(getattr(base_model, "base", base_model), "config", None)
    return getattr(config, "name_or_path", None) or None


def _result(url: str, info: Any) -> HubModule:
    """One listed model: the listing's fields must have their types; card fields of a wrong type read as absent."""
    repo_id = info.get("id") if isinstance(info, dict) else None
    if not (isinstance(repo_id, str) and HUB_ID_RE.match(repo_id)):
        raise _malformed(url, f"a result is not a model record with a repo id ({str(info)[:60]!r})")
    tags, modified, data = info.get("tags", []), info.get("lastModified"), info.get("cardData")
    data = {} if data is None else data
    if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags) and isinstance(data, dict)
            and (modified is None or isinstance(modified, str))):
        raise _malformed(url, f"{repo_id}: tags, cardData or lastModified has the wrong type")
    card = data.get(LIBRARY) if isinstance(data.get(LIBRARY), dict) else {}
    kinds = card.get("kinds") if isinstance(card.get("kinds"), list) else []
    base = card.get("base_model").get("name") if isinstance(card.get("base_model"), dict) else None
    base = base if isinstance(base, str) and base else data.get("base_model")
    return HubModule(repo_id=repo_id, kinds=[k for k in kinds if isinstance(k, str)],
                     task=_text(card.get("task")), base_model=_text(base), tags=tags, last_modified=modified)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _malformed(url: str, problem: str) -> HubError:
    return HubError(f"cannot search the Hub: {public(url)} answered a malformed listing ({problem}); check the "
                    "endpoint (endpoint=, HF_ENDPOINT)")
