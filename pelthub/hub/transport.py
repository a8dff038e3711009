"""The HTTP library under huggingface_hub: `httpx2` from huggingface_hub 2.0 on, `httpx` in 1.x.

Some hub calls leak that library's transport errors (a refused connection, a
timeout) instead of raising a hub error; pelthub catches them by this name.
"""
from __future__ import annotations

try:  # huggingface_hub >= 2
    from httpx2 import TransportError
except ImportError:  # huggingface_hub 1.x
    from httpx import TransportError

__all__ = ["TransportError"]
