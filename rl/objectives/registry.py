"""Name -> objective class registry.

Objectives register themselves with ``@register_objective("name")``; the trainer and the
config layer only ever go through ``get_objective`` / ``objective_defaults``, so there is no
if/elif on algorithm names anywhere else.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping, TypeVar

_REGISTRY: dict[str, type] = {}

#: The registered objective names (a live read-only mapping name -> class; iterate it for names).
OBJECTIVES: Mapping[str, type] = types.MappingProxyType(_REGISTRY)

T = TypeVar("T", bound=type)


def register_objective(name: str) -> Callable[[T], T]:
    """Class decorator: register an objective class under ``name``.

    The class must define ``Config`` (a dataclass of its hyperparameters). Registering a name
    twice is an error, so two modules cannot silently shadow each other.
    """

    def deco(cls: T) -> T:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is already registered ({_REGISTRY[name].__name__})")
        if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
            raise TypeError(f"objective {name!r}: class {cls.__name__} needs a dataclass `Config`")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _lookup(name: str) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown objective {name!r}; valid objectives: {', '.join(sorted(_REGISTRY))}"
        ) from None


def build_config(config_cls: type, hparams: Mapping[str, Any], what: str):
    """Instantiate ``config_cls(**hparams)``, rejecting unknown keys with the valid ones listed."""
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for {what}; "
            f"valid: {', '.join(valid)}"
        )
    return config_cls(**hparams)


def get_objective(name: str, **hparams: Any):
    """Build the objective registered as ``name`` with hyperparameter overrides.

    Raises ValueError for an unknown name (listing the registered names) or an unknown
    hyperparameter (naming it and listing the valid ones).
    """
    return _lookup(name)(**hparams)


def objective_defaults(name: str) -> dict[str, Any]:
    """Hyperparameter names -> default values of objective ``name`` (for YAML validation)."""
    return dataclasses.asdict(_lookup(name).Config())
