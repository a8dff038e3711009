"""Find pelthub modules on the Hub by base model, kind, task and author (`HfApi.list_models` filters).

Pushed cards tag every repo with `pelthub`, each kind, the task and
`base_model:adapter:<base id>`, so each filter is one Hub tag and the Hub
does the filtering; the results carry what the cards say.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..registry.card import LIBRARY
from .client import api, preflight, translated


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
           limit: int | None = 100, timeout: float | None = None) -> list[HubModule]:
    """pelthub modules on the Hub matching every filter given, as `HubModule`s.

    base_model: a Hub model id, or a model whose `config.name_or_path` is one.
    """
    filters = [LIBRARY, *([kind] if kind else []), *([task] if task else [])]
    base = _base_id(base_model)
    if base:
        filters.append(f"base_model:adapter:{base}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"limit must be a positive number of results (or None for all), got {limit!r}")
    preflight(endpoint, "search the Hub", timeout)
    with translated("search the Hub", endpoint=endpoint, token=token, timeout=timeout):
        found = list(api(endpoint, token).list_models(filter=filters, author=author, limit=limit, cardData=True))
    return [_result(m) for m in found]


def _base_id(base_model: nn.Module | str | None) -> str | None:
    if base_model is None or isinstance(base_model, str):
        return base_model or None
    config = getattr(getattr(base_model, "base", base_model), "config", None)
    return getattr(config, "name_or_path", None) or None


def _result(info: Any) -> HubModule:
    data = info.card_data.to_dict() if getattr(info, "card_data", None) is not None else {}
    card = data.get(LIBRARY) if isinstance(data.get(LIBRARY), dict) else {}
    tags = list(info.tags or [])
    base = card.get("base_model", {}).get("name") if isinstance(card.get("base_model"), dict) else None
    modified = getattr(info, "last_modified", None)
    return HubModule(repo_id=info.id, kinds=list(card.get("kinds") or []), task=card.get("task"),
                     base_model=base or data.get("base_model"), tags=tags,
                     last_modified=modified.isoformat() if modified is not None else None)
