"""How weighted modules combine: compose() and, later, mixtures, merging and weight search."""
from .compose import compose

__all__ = ["compose"]
