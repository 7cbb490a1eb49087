"""The reward package's one error type (its own module so that config and loading share it)."""


class RewardError(ValueError):
    """A reward function is misconfigured or failed; the message names the function and the fix."""
