"""Short names for reward functions, so YAML can say `path: math_verify`.

The registry maps a short name to an import path ("module:function"), never to a function
object: workers load every reward by path in their own process, so a name must resolve to
something importable there. That also lets a name point at a module that does not exist yet
(e.g. `arithmetic`): it fails only when someone uses it.
"""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

# name -> "module:function"
_REGISTRY: dict[str, str] = {}


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


def _populate() -> None:
    # Importing the built-ins fills the registry through their decorators; done lazily so
    # `import rewards` stays cheap and free of math-verify until a name is looked up.
    import rewards.builtin  # noqa: F401


def registered_names() -> list[str]:
    """All short names, sorted."""
    _populate()
    return sorted(_REGISTRY)


def lookup(name: str) -> str | None:
    """Import path for a short name, or None if the name is not registered."""
    _populate()
    return _REGISTRY.get(name)


# Written by another part of the project; registered by path so that importing the registry
# never requires the module to exist.
register_path("arithmetic", "rewards.arithmetic:arithmetic_reward")
