"""User-facing errors: one paragraph, no traceback wall, non-zero exit."""


class UserError(Exception):
    """A mistake in the user's input (config, data, model path, reward): printed without a traceback."""


class ConfigError(UserError, ValueError):
    """A config key, type or value is wrong; the message names the field, the value and the fix."""


class DataError(UserError, ValueError):
    """The dataset cannot be used as configured (missing column, unreadable file)."""


class SyncError(RuntimeError):
    """Rollout weights disagree with the learner's after a sync: training on them would be off-policy."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); the message says why and how to resume."""


def raised_in_actor(exc: BaseException | None) -> str | None:
    """The message of a UserError that an actor raised in its constructor (rl/node_paths.py),
    found in `exc`'s chain of causes, or None. Ray hands the driver an ActorDiedError that
    carries the original error as text only (its traceback ends `rl.errors.UserError: ...`)."""
    marker = f"{UserError.__module__}.{UserError.__name__}: "
    seen = set()
    while exc is not None and id(exc) not in seen:
        text = str(exc)
        if marker in text:
            return text.rsplit(marker, 1)[1].splitlines()[0].strip()
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
