"""The small field checks the config sections share: each raises ConfigError naming the field,
the value and what is valid."""

from __future__ import annotations

from rl.errors import ConfigError


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{name} = {value} must be a positive integer.")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} = {value!r} is not valid: use one of {', '.join(choices)}.")
