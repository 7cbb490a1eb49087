"""What crosses the actor boundary between rollout workers and the driver."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SampleRequest:
    """One prompt to sample `group_size` times."""

    group_id: int
    """Same id = same prompt; advantages are normalized within a group."""
    prompt_ids: list[int]
    """Prompt token ids (chat template already applied)."""


@dataclass
class Sample:
    """One generated response."""

    group_id: int
    sample_index: int
    """0..group_size-1 within the group."""
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    logprobs: list[float]
    """Behavior log-prob of each response token: the engine's log-prob under the distribution
    it sampled from (temperature, top-p and logits processors such as HAPO's applied),
    [len(response_ids)]."""
    finish_reason: str
    """`stop` (EOS or stop string) or `length` (hit max_new_tokens)."""
    policy_version: int = 0
    """Weights version that produced the tokens: the number of weight syncs the engine had
    loaded (0 = the initial weights); with partial rollouts the OLDEST version among its tokens.
    The learner is at version `step - 1` when it trains."""
    token_versions: list[int] | None = None
    """Partial rollouts: the weights version of each response token (a sequence interrupted by
    a weight update resumes from its prefix under the new weights); None: all policy_version."""


@dataclass
class RolloutStats:
    """Measures of one worker's rollout."""

    seconds: float = 0.0
    generated_tokens: int = 0
    decode_steps: int = 0
    """Engine steps until every sample finished."""
    peak_running: int = 0
    """Most sequences in flight at once."""
    peak_kv_tokens: int = 0
    """Own accounting: max over steps of sum(prompt + generated) of running sequences."""
    preemptions: int = 0
    scheduler_seconds: float = 0.0
    """Time spent inside the admission policy."""
    extra: dict = field(default_factory=dict)


@dataclass
class PartialSample:
    """A sample interrupted by a weight update (rollout.partial): its prefix so far."""

    group_id: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    """Tokens generated before the interruption (possibly none)."""
    logprobs: list[float]
    token_versions: list[int]
    max_new_tokens: int
    """The sample's whole budget; the continuation gets what is left of it."""


@dataclass
class RolloutResult:
    samples: list[Sample]
    stats: RolloutStats
    unfinished: list[PartialSample] = field(default_factory=list)
    """Partial rollouts: samples interrupted by a weight update, to be resumed."""
