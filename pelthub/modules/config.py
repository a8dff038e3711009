"""Config base class: frozen dataclasses, validated on construction, JSON round-trippable.

Each module kind declares one config dataclass that subclasses `ModuleConfig`
and sets `kind`. `config_from_dict` rebuilds any registered kind from the JSON
written by `to_dict`, so saved modules carry no Python objects.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterable, Mapping, Union

from ..errors import ConfigError

_KINDS: dict[str, type["ModuleConfig"]] = {}


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
    if kind not in _KINDS:
        raise ConfigError(f"unknown module kind {kind!r}; known kinds: {sorted(_KINDS)}")
    cls = _KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {sorted(unknown)}; fields are {sorted(names)}")
    return cls(**data)


def known_kinds() -> list[str]:
    return sorted(_KINDS)


# --- validation helpers: one line per check in each config's validate() ---

def positive_int(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{owner}.{field} must be a positive integer, got {value!r}")


def positive_number(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{owner}.{field} must be a positive number, got {value!r}")


def probability(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{owner}.{field} must be in [0, 1), got {value!r}")


def one_of(owner: str, field: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{owner}.{field} must be one of {list(allowed)}, got {value!r}")


def targets(owner: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or not value or not all(isinstance(t, str) and t for t in value):
        raise ConfigError(
            f"{owner}.targets must be a non-empty list of site roles or module-name suffixes "
            f"(e.g. ['q', 'v'] or ['attention.self.query']), got {value!r}"
        )
