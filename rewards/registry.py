"""Short names for reward functions, so YAML can say `path: math_verify`.

The registry maps a short name to an import path ("module:function"), never to a function
object: workers load every reward by path in their own process, so a name must resolve to
something importable there. The built-ins are listed below by path, so this module imports
nothing (in particular not the reward modules, nor math-verify): looking a name up is free,
and the function's module is imported only when a reward is loaded. Users add names with
`register` (a decorator) or `register_path`.
"""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

# name -> "module:function". A new built-in: a module-level function in rewards/ and a line here
# (tests/test_import_graph.py checks that every path imports).
BUILTINS: dict[str, str] = {
    "math_verify": "rewards.builtin:math_verify_reward",
    "exact_match": "rewards.builtin:exact_match_reward",
    "format": "rewards.builtin:format_reward",
    "length_penalty": "rewards.builtin:length_penalty",
    "dapo_overlong": "rewards.builtin:dapo_overlong_reward",
    "arithmetic": "rewards.arithmetic:arithmetic_reward",
}

_REGISTRY: dict[str, str] = dict(BUILTINS)


def register_path(name: str, path: str) -> None:
    """Register `name` for the reward at import path `path` ("module:function")."""
    if name in _REGISTRY and _REGISTRY[name] != path:
        raise ValueError(
            f"reward name {name!r} is already registered for {_REGISTRY[name]!r}; "
            f"cannot register it again for {path!r}"
        )
    if ":" not in path:
        raise ValueError(f"reward path {path!r} for name {name!r} must look like 'module:function'")
    _REGISTRY[name] = path


def register(name: str) -> Callable[[F], F]:
    """Decorator: register a module-level function under a short name.

    Example:
        >>> @register("always_one")            # doctest: +SKIP
        ... def always_one(completion: str) -> float:
        ...     return 1.0
    """

    def deco(fn: F) -> F:
        register_path(name, f"{fn.__module__}:{fn.__name__}")
        return fn

    return deco


def registered_names() -> list[str]:
    """All short names, sorted."""
    return sorted(_REGISTRY)


def lookup(name: str) -> str | None:
    """Import path for a short name, or None if the name is not registered."""
    return _REGISTRY.get(name)
