"""The HTTP library under huggingface_hub: `httpx2` from huggingface_hub 2.0 on, `httpx` in 1.x.

Some hub calls leak that library's errors (a refused connection, a timeout)
instead of raising a hub error; pelthub catches them through this alias.
"""
from __future__ import annotations

try:  # huggingface_hub >= 2
    import httpx2 as http
except ImportError:  # huggingface_hub 1.x
    import httpx as http  # type: ignore[no-redef]

__all__ = ["http"]
