"""The local catalogue of modules: cards, a sha256 blob store and a SQLite index."""
from .card import Card, check_name, parse_ref
from .ranking import Ranking
from .registry import GcReport, Registry, VerifyReport, parent_entries, require_registry

__all__ = ["Card", "GcReport", "Ranking", "Registry", "VerifyReport", "check_name", "parent_entries", "parse_ref", "require_registry"]
