"""How weighted modules combine: compose(), composition blocks, merging and weight search."""
from .blocks import Average, Block, Stack, WeightedSum, block_from_dict, parents
from .compose import compose
from .merge import merge
from .search import search_weights

__all__ = ["Average", "Block", "Stack", "WeightedSum", "block_from_dict", "compose", "merge", "parents",
           "search_weights"]
