"""Data model shared by the predictors, the policies, the simulator and the rollout executor.

A `Seq` is one sample to generate: one of the G samples of a prompt (its `group_id`). The executor
and the simulator own the records and advance `generated`; policies and predictors only read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable

SeqId = Hashable  # int in the simulator; the executor may use vLLM request-id strings
GroupId = Hashable


@dataclass
class Seq:
    """One pending or running sequence.

    KV accounting is our own (not the engine's): a sequence holds `prompt_tokens + generated`
    tokens of KV cache. Siblings share the prompt prefix in vLLM's prefix cache, but we count the
    prompt once per sequence so that a plan stays safe when prefix caching is off or evicted.
    """

    seq_id: SeqId
    """Unique id within one rollout."""
    group_id: GroupId
    """Samples of the same prompt share a group id (the GRPO group)."""
    prompt_tokens: int
    """Number of prompt tokens."""
    max_new_tokens: int
    """Generation cap; the true output length is in [1, max_new_tokens]."""
    generated: int = 0
    """Output tokens generated so far (advanced by the executor / simulator)."""
    prompt_ids: tuple[int, ...] | None = field(default=None, repr=False)
    """Prompt token ids, optional: feeds the token-conditioned length predictor."""
    prompt_features: Any = field(default=None, repr=False)
    """The prompt's EGTP features ([hidden] array: rollout/prompt_encoder.py), optional:
    feeds the egtp length predictor. Siblings share one array."""

    def __post_init__(self) -> None:
        if self.prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be >= 0, got {self.prompt_tokens}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.generated <= self.max_new_tokens:
            raise ValueError(f"generated={self.generated} outside [0, {self.max_new_tokens}]")

    @property
    def kv_tokens(self) -> int:
        """KV tokens held right now (prompt + generated)."""
        return self.prompt_tokens + self.generated
