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
