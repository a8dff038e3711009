"""Config base class: frozen dataclasses, validated on construction, JSON round-trippable.

Each module kind declares one config dataclass that subclasses `ModuleConfig`
and sets `kind`. `config_from_dict` rebuilds any registered kind from the JSON
written by `to_dict`, so saved modules carry no Python objects.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar, Iterable, Mapping, Union

from ..errors import ConfigError

_KINDS: dict[str, type["ModuleConfig"]] = {}

# Sizes a config may declare. A config is data from files and the Hub, and what it declares
# is allocated (or built on the meta device, which still costs time per layer and site):
# these caps refuse a rank of 10**9 or 10**6 tasks before anything is built. Each is far
# above real use: LoRA ranks reach 1024, hidden sizes 16384-25600, FFN widths 53248.
MAX_SIZE = 1 << 16    # ranks, lengths, widths, reductions, heads, skills, top_k; a base model's hidden size
MAX_LAYERS = 512      # layers of a base model (the deepest released have under 200; each costs build time)
MAX_TASKS = 1 << 14   # tasks of a Poly / PerTask / AttentionMix (one parameter row or set each)
MAX_VOCAB = 1 << 21   # vocabulary-sized fields (Prompt.vocab_top; the largest vocabularies are ~262k)
MAX_SCALE = 1e6       # alphas and scales: finite and at most this (1e6 already trains nothing); temperatures: finite
# Python types a field's annotation may name, for the type check every config runs
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
                                       "None": (type(None),)}


@dataclasses.dataclass(frozen=True)
class ModuleConfig:
    """Base of every module config. Subclasses validate in `validate()`."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _KINDS[cls.kind] = cls

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # JSON gives lists and nested dicts; keep configs hashable
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
            elif isinstance(value, dict) and "kind" in value:
                object.__setattr__(self, f.name, config_from_dict(value))
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the bad field; the default accepts anything."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ModuleConfig):  # nested configs (UniPELT's parts) as their own dicts
                value = value.to_dict()
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> "ModuleConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, eq=False)
class Sourced:
    """A config plus what its module is built from: trained source modules, prompt values, a registry.

    The config stays pure data: it is what a saved model records, and it rebuilds the module
    empty (`init=False`) for the saved tensors to fill. `inputs` live only until the module is
    built; `build` hands them to `config.build(..., **inputs)`. Fields read through to the
    config, so `Poly.from_modules(...).tasks` reads as on the config itself.
    """

    config: ModuleConfig
    inputs: Mapping[str, Any]

    @property
    def kind(self) -> str:
        return self.config.kind

    def build(self, base: Any, sites: Any, **kwargs: Any) -> Any:
        return self.config.build(base, sites, **{**kwargs, **self.inputs})

    def replace(self, **changes: Any) -> "Sourced":
        """A changed config with the same inputs."""
        return Sourced(self.config.replace(**changes), self.inputs)

    def given(self, **defaults: Any) -> "Sourced":
        """The same, with `defaults` for inputs that are missing or None (compose's registry=)."""
        return Sourced(self.config, {**self.inputs, **{k: v for k, v in defaults.items()
                                                       if self.inputs.get(k) is None}})

    def to_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("config", "inputs"):  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.config, name)


Buildable = Union[ModuleConfig, Sourced]


def config_from_dict(data: dict[str, Any]) -> ModuleConfig:
    """Rebuild a config written by `ModuleConfig.to_dict`."""
    data = dict(data)
    kind = data.pop("kind", None)
    if not isinstance(kind, str) or kind not in _KINDS:
        raise ConfigError(f"unknown module kind {kind!r}; known kinds: {sorted(_KINDS)}")
    cls = _KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {sorted(unknown)}; fields are {sorted(names)}")
    return cls(**data)


def known_kinds() -> list[str]:
    return sorted(_KINDS)


# --- validation: `check_fields` runs on every config; one helper call per range check in validate() ---

def check_fields(config: Any) -> None:
    """Types and finiteness of every field of a config dataclass, before its own `validate()`.

    A field annotated with plain types (int, float, bool, str, None and unions of them) must hold
    one of them, and a bool is not an int: True as a rank or 1 as a flag is refused, not read
    as 1 / True. Every float anywhere in a field (lists included) must be finite.
    """
    owner = type(config).__name__
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        names = [t.strip() for t in str(f.type).split("|")]
        if all(n in _TYPES for n in names):
            allowed = tuple(t for n in names for t in _TYPES[n])
            if not isinstance(value, allowed) or isinstance(value, bool) and bool not in allowed:
                raise ConfigError(f"{owner}.{f.name} must be {' or '.join(names)}, got {type(value).__name__} "
                                  f"{value!r:.80}")
        finite(owner, f.name, value)


def finite(owner: str, field: str, value: Any) -> None:
    """Refuse NaN or ±Infinity in `value` or in the lists and mappings it holds (not in nested configs)."""
    stack = [value]
    while stack:
        x = stack.pop()
        if isinstance(x, float) and not math.isfinite(x):
            raise ConfigError(f"{owner}.{field} must hold finite numbers, got {x!r}")
        if isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())


def positive_int(owner: str, field: str, value: Any, maximum: int = MAX_SIZE) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= maximum:
        raise ConfigError(f"{owner}.{field} must be an integer from 1 to {maximum:,} (pelthub's cap, far above "
                          f"real models, checked before anything is built), got {value!r:.80}")


def positive_number(owner: str, field: str, value: Any, maximum: float = MAX_SCALE) -> None:
    """A finite number in (0, maximum]; maximum=math.inf for temperatures, where 1e30 means "uniform"."""
    if not _is_number(value) or not 0 < value <= maximum:
        bound = f"in (0, {maximum:g}]" if maximum < math.inf else "above 0"
        raise ConfigError(f"{owner}.{field} must be a finite number {bound}, got {value!r:.80}")


def probability(owner: str, field: str, value: Any) -> None:
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{owner}.{field} must be a number in [0, 1), got {value!r:.80}")


def finite_numbers(owner: str, field: str, values: Any, count: int, per: str = "") -> tuple[float, ...]:
    """`count` finite numbers (combination weights; numpy scalars too) as floats; bools and strings are not numbers."""
    values = None if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable) else tuple(values)
    if values is None or len(values) != count or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ConfigError(f"{owner}.{field} must be {count} finite number(s){f' ({per})' if per else ''}, "
                          f"got {values!r:.120}")
    return tuple(float(v) for v in values)


def flag(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}.{field} must be true or false, got {value!r:.80}")


def one_of(owner: str, field: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{owner}.{field} must be one of {list(allowed)}, got {value!r:.80}")


def task_names(owner: str, value: Any) -> Any:
    """Task names as given, or "0" … "n-1" for a count n; a count over MAX_TASKS is refused before expanding."""
    if type(value) is int:  # not True: a bool is left for validate() to refuse, like 1.9
        positive_int(owner, "tasks", value, MAX_TASKS)
        return tuple(str(i) for i in range(value))
    if isinstance(value, (list, tuple)) and len(value) > MAX_TASKS:
        raise ConfigError(f"{owner}.tasks lists {len(value):,} tasks; at most {MAX_TASKS:,} are built")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def targets(owner: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or not value or not all(isinstance(t, str) and t for t in value):
        raise ConfigError(
            f"{owner}.targets must be a non-empty list of site roles or module-name suffixes "
            f"(e.g. ['q', 'v'] or ['attention.self.query']), got {value!r}"
        )
