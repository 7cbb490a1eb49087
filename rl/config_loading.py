"""Reading a config: YAML + `key=value` overrides merged onto the typed schema of rl/config.py,
OmegaConf's errors turned into one paragraph naming the field, and the resolved config written
back out (with secrets from the environment redacted)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from rl.config import Config, ObjectiveConfig
from rl.errors import ConfigError


def _split_objective(raw: dict) -> dict:
    """`objective: {name, k: v...}` (the YAML form) -> `{name, params: {k: v}}` (the schema's)."""
    section = raw.get("objective")
    if section is None:
        return raw
    if not isinstance(section, dict):
        raise ConfigError(f"objective = {section!r} must be a mapping, e.g. `objective: {{name: grpo}}`.")
    section = dict(section)
    params = dict(section.pop("params", None) or {})
    name = section.pop("name", ObjectiveConfig.name)
    params.update(section)
    raw["objective"] = {"name": name, "params": params}
    return raw


def _field_at(full_key: str) -> tuple[type | None, str, Any]:
    """(the dataclass that holds `full_key`, its section name, the field's type hint).

    `full_key` is OmegaConf's dotted path, e.g. `reward.functions[0].weight`.
    """
    cls: Any = Config
    section = ""
    parts = [p for p in full_key.replace("[", ".[").split(".") if p]
    hint: Any = None
    for i, part in enumerate(parts):
        if part.startswith("["):  # a list item: descend into the element type
            args = typing.get_args(hint)
            hint = args[0] if args else None
            cls = hint if dataclasses.is_dataclass(hint) else None
            continue
        if cls is None or not dataclasses.is_dataclass(cls):
            return None, section, None
        hints = typing.get_type_hints(cls)
        if i == len(parts) - 1 or part not in hints:
            return cls, section, hints.get(part)
        hint = hints[part]
        section = ".".join(parts[: i + 1]).replace(".[", "[")
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        cls = hint if dataclasses.is_dataclass(hint) else (inner[0] if inner and dataclasses.is_dataclass(inner[0]) else None)
    return cls, section, hint


def _type_name(hint: Any) -> str:
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and inner:
        hint = inner[0]
    return getattr(hint, "__name__", str(hint))


def _schema_error(e: Exception) -> ConfigError:
    """OmegaConf's error for an unknown key or a wrong type -> one paragraph naming the field."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    full_key = str(getattr(e, "full_key", "") or "")
    cls, section, hint = _field_at(full_key)
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) or (cls is not None and hint is None):
        where = section or "the top level"
        valid = ", ".join(f.name for f in dataclasses.fields(cls)) if cls is not None else ""
        return ConfigError(f"Unknown key {full_key} in {where}. Valid keys of {where}: {valid}.")
    value = getattr(e, "value", None)
    return ConfigError(f"{full_key} = {value!r} has the wrong type: expected {_type_name(hint)}, "
                       f"got {type(value).__name__}.")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (optional), apply `key=value` overrides, merge onto the typed schema
    (`OmegaConf.structured(Config)`), and build the dataclasses, whose `__post_init__` checks run."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        user = OmegaConf.create({})
        if path is not None:
            path = Path(path)
            if not path.exists():
                raise ConfigError(f"Config file {str(path)!r} does not exist. "
                                  f"Pass a YAML file, e.g. configs/quickstart.yaml.")
            user = OmegaConf.load(path)
        user = OmegaConf.merge(user, OmegaConf.from_dotlist(list(overrides or [])))
        raw = OmegaConf.to_container(user, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"Could not read the config ({path}, overrides {overrides}): {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"The config must be a mapping of sections (model, data, ...), got {raw!r}.")
    raw = _split_objective(raw)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise _schema_error(e) from None
    except ValueError as e:  # a section's own check (rewards, scheduling) with its own error type
        raise ConfigError(str(e)) from None


def config_to_dict(config: Config) -> dict:
    """Plain dict (YAML-ready), with objective params flattened back next to `name`.

    It is written to config.yaml and handed to the trackers, so it never carries a secret from
    the environment: the config holds no environment values of its own, and a value that one
    came into (a YAML `${oc.env:HF_TOKEN}`) is replaced by `<redacted $NAME>`."""
    d = dataclasses.asdict(config)
    d["objective"] = {"name": config.objective.name, **config.objective.params}
    return _redact_environment(d)


_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")


def _redact_environment(value: Any, secrets: dict[str, str] | None = None) -> Any:
    """`value` with every environment secret (a variable whose name has KEY, TOKEN, SECRET,
    PASSWORD, CREDENTIAL or AUTH in it, 8+ characters) cut out of its strings."""
    import os

    if secrets is None:
        secrets = {v: k for k, v in os.environ.items()
                   if len(v) >= 8 and any(w in k.upper() for w in _SECRET_WORDS)}
    if isinstance(value, dict):
        return {k: _redact_environment(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_environment(v, secrets) for v in value)
    if isinstance(value, str):
        for secret, name in secrets.items():
            value = value.replace(secret, f"<redacted ${name}>")
    return value
