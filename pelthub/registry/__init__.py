"""The local catalogue of modules: cards, a sha256 blob store and a SQLite index."""
from .card import Card, check_name, parse_ref
from .registry import GcReport, Registry, VerifyReport

__all__ = ["Card", "GcReport", "Registry", "VerifyReport", "check_name", "parse_ref"]
