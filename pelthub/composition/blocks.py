"""Composition blocks: data saying which existing modules combine, and how.

A *source* is a module to reuse, given as one of

- a saved module directory (what `save_pretrained` writes), as str or Path;
- a registry ref, 'name' or 'name@version' (a string that is not a directory),
X
- an in-memory module: a ModularModel holding it, or a built module such as
  the result of `merge`;
- inside `Stack` also a ModuleConfig: a fresh module that trains;
- another block: blocks nest, e.g. `Stack(Average(a, b), ph.IA3())` or
  `Average(Average(a, b), c)` (a source of a sum must come to one module).

Blocks (`compose` turns them into attached module sets):

- `Stack(*sources)`: each source attached in order as its own set. Hooks at
  one site run in attachment order, so sequential adapters compose as
  h ← h₁ + a₂(h₁) with h₁ = h + a₁(h); LoRA deltas add; prompts are prepended
  one after another.
- `WeightedSum(sources, weights)`: Σᵢ wᵢ·Mᵢ over modules of one kind, exactly:
  LoRA as one LoRA with A = [A₁; …; A_K] and B = [w₁s₁B₁, …, w_K s_K B_K], so
  ΔW = Σᵢ wᵢ sᵢ BᵢAᵢ (sᵢ = αᵢ/rᵢ); prompts as P = Σᵢ wᵢPᵢ (equal lengths).
- `Average(*sources)`: WeightedSum with wᵢ = 1/K.

Modules taken from sources are frozen in the composed model (their heads are
not taken); configs in a Stack train. Blocks whose sources are directories,
refs, configs or such blocks round-trip through `to_dict` / `block_from_dict`.
A composed model keeps its blocks as data in `model.composition` (each with
the module sets it became under "sets"), which `save_pretrained` writes into
pelthub.json beside the attached (for sums: already merged) modules, so a
loaded model has the same structure and the same outputs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Union

from torch import nn

from ..errors import ConfigError, IncompatibleModuleError
from ..model import ModularModel, from_pretrained
from ..sites import Sites
from ..modules.base import PeltModule
from ..modules.config import ModuleConfig, Sourced, config_from_dict, finite_numbers
from ..registry import parent_entries, require_registry

Source = Union[str, os.PathLike, ModularModel, PeltModule, ModuleConfig, Sourced, "Block"]
IN_MEMORY = "in_memory"  # how a source without a name (a module object) is written in `model.composition`
_BLOCKS: dict[str, type["Block"]] = {}


class Block:
    """Base of composition blocks: a tuple of sources plus the block's own fields."""

    name: ClassVar[str] = ""
    sources: tuple[Source, ...]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _BLOCKS[cls.name] = cls

    def to_dict(self, strict: bool = True) -> dict[str, Any]:
        """The block as JSON data; strict=False writes in-memory sources as {"in_memory": what} (a record
        of the structure that cannot be rebuilt) instead of raising."""
        return {"block": self.name, "sources": [_source_to_data(s, strict) for s in self.sources]}


@dataclass(frozen=True, init=False)
class Stack(Block):
    """Sources applied in sequence, each as its own module set."""

    name: ClassVar[str] = "stack"
    sources: tuple[Source, ...]

    def __init__(self, *sources: Source):
        object.__setattr__(self, "sources", _checked_sources("Stack", sources))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Stack":
        return cls(*map(_source_from_data, data["sources"]))


@dataclass(frozen=True)
class WeightedSum(Block):
    """Σᵢ wᵢ·Mᵢ of LoRA modules (exact delta sum) or of prompts (sum of prompt tensors)."""

    name: ClassVar[str] = "weighted_sum"
    sources: tuple[Source, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", _checked_sources("WeightedSum", self.sources, configs=False))
        object.__setattr__(self, "weights", finite_numbers("WeightedSum", "weights", self.weights,
                                                            len(self.sources), "one weight per source"))

    def to_dict(self, strict: bool = True) -> dict[str, Any]:
        return {**super().to_dict(strict), "weights": list(self.weights)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WeightedSum":
        return cls(tuple(map(_source_from_data, data["sources"])), data.get("weights"))


@dataclass(frozen=True, init=False)
class Average(Block):
    """The uniform WeightedSum: wᵢ = 1/K."""

    name: ClassVar[str] = "average"
    sources: tuple[Source, ...]

    def __init__(self, *sources: Source):
        object.__setattr__(self, "sources", _checked_sources("Average", sources, configs=False))

    @property
    def weights(self) -> tuple[float, ...]:
        return (1.0 / len(self.sources),) * len(self.sources)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Average":
        return cls(*map(_source_from_data, data["sources"]))


def block_from_dict(data: dict[str, Any]) -> Block:
    """Rebuild a block written by `Block.to_dict`."""
    if not isinstance(data, dict) or data.get("block") not in _BLOCKS:
        raise ConfigError(f"not a composition block: {data!r}; blocks are {sorted(_BLOCKS)}")
    return _BLOCKS[data["block"]].from_dict(data)


def _checked_sources(what: str, sources: Any, configs: bool = True) -> tuple[Source, ...]:
    sources = tuple(sources)
    allowed = (str, os.PathLike, ModularModel, PeltModule, Block) + ((ModuleConfig, Sourced) if configs else ())
    bad = [s for s in sources if not isinstance(s, allowed)]
    if not sources or bad:
        raise ConfigError(f"{what} takes one or more modules: saved directories, registry refs, ModularModels or "
                          f"built modules{', or configs' if configs else ''}; got {bad or 'none'}")
    return sources


def _source_to_data(source: Source, strict: bool = True) -> Any:
    if isinstance(source, Block):
        return source.to_dict(strict)
    if isinstance(source, (ModuleConfig, Sourced)):
        return source.to_dict()
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if not strict:
        return {IN_MEMORY: _describe(source)}
    raise ConfigError(f"an in-memory {type(source).__name__} cannot be written as data; save it "
                      "(save_pretrained or Registry.add) and reference its directory or registry ref")


def _source_from_data(data: Any) -> Source:
    if isinstance(data, dict) and "block" in data:
        return block_from_dict(data)
    if isinstance(data, dict) and IN_MEMORY in data:
        raise ConfigError(f"this block was composed from an in-memory {data[IN_MEMORY]}, which has no name to "
                          "rebuild it from; the composed model's saved modules hold its result")
    if isinstance(data, dict):
        return config_from_dict(data)
    if not isinstance(data, str):
        raise ConfigError(f"a block source must be a directory, a registry ref, a config or a block, got {data!r}")
    return data


# ----- resolving sources to built modules -----

def raw_base(base: nn.Module) -> nn.Module:
    return base.base if isinstance(base, ModularModel) else base


def load_source(source: Source, base: nn.Module | None, registry: Any = None) -> list[PeltModule]:
    """The built modules a source holds (every kind of every set), checked against `base` when known."""
    if isinstance(source, PeltModule):
        return [source]
    if isinstance(source, ModularModel):
        if base is not None and source.sites.fingerprint()["sha256"] != Sites(raw_base(base)).fingerprint()["sha256"]:
            raise IncompatibleModuleError(f"a source module was trained on {type(source.base).__name__} with "
                                          "another architecture than this base; use modules of this base model")
        return [m for s in source.adapters.values() for m in s.values()]
    if isinstance(source, ModuleConfig):
        raise ConfigError(f"a {source.kind} config is a fresh module, not a trained one; only Stack takes configs")
    if base is None:
        raise ConfigError(f"loading {os.fspath(source)!r} needs the base model: pass base=")
    if Path(source).is_dir():
        loaded = from_pretrained(raw_base(base), source, heads=False)
    else:
        loaded = require_registry(registry, f"source {os.fspath(source)!r}").load(os.fspath(source), raw_base(base),
                                                                            heads=False)
    modules = [m for s in loaded.adapters.values() for m in s.values()]
    loaded.detach()
    return modules


def load_single(source: Source, base: nn.Module | None, registry: Any = None) -> PeltModule:
    """The one module a source holds; mixtures take exactly one module per source."""
    modules = load_source(source, base, registry)
    if len(modules) != 1:
        raise ConfigError(f"source {_describe(source)} holds {len(modules)} modules "
                          f"({[m.config.kind for m in modules]}); mixtures and merges take one module per source")
    return modules[0]


def parents(*blocks: Any, registry: Any = None) -> list[dict[str, Any]]:
    """{"ref", "sha256"} of every registry-ref source in `blocks`, for `save_pretrained(dir, parents=...)`.

    Directories and in-memory modules have no registry identity and are not listed.
    """
    refs = [s for b in blocks if isinstance(b, Block) for s in _leaves(b) if isinstance(s, str) and not Path(s).is_dir()]
    return parent_entries(require_registry(registry, f"source {refs[0]!r}"), refs) if refs else []


def _leaves(block: Block) -> list[Source]:
    """The sources of a block and of the blocks nested in it, in order."""
    return [leaf for s in block.sources for leaf in (_leaves(s) if isinstance(s, Block) else [s])]


def _describe(source: Source) -> str:
    return repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else type(source).__name__
