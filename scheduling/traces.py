"""Length traces: synthetic long-tailed generators and the JSON file format for recorded rollouts.

JSON format (version 1), one object per file; `prompt_ids` and `meta` are optional:

    {
      "format": "rl-infinite/length-trace",
      "version": 1,
      "max_new_tokens": 256,
      "meta": {"model": "SmolLM2-135M-Instruct", "temperature": 1.0, "step": 0},
      "groups": [
        {"group_id": 0, "prompt_tokens": 37, "prompt_ids": [1, 504, ...], "lengths": [12, 56, 256]},
        ...
      ]
    }

`lengths` are output tokens per sample (EOS included if generated); a sample truncated by the
cap has length == max_new_tokens. One file holds one rollout (B groups x G samples); a recorder
writes `step_XXXX.json` files or one file per experiment, as it likes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .types import GroupId, Seq

TRACE_FORMAT = "rl-infinite/length-trace"
TRACE_VERSION = 1


@dataclass
class Trace:
    """A rollout's work: items (group_id, prompt_tokens, length), one per sample."""

    items: list[tuple[GroupId, int, int]]
    max_new_tokens: int
    prompt_ids: dict[GroupId, tuple[int, ...]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    prompt_features: dict[GroupId, Any] = field(default_factory=dict)
    """EGTP features per group, for the egtp predictor: computed from `prompt_ids` with the
    model (rl.bench rollout --simulate does), never saved in the JSON trace."""

    def __post_init__(self) -> None:
        for g, p, n in self.items:
            if not 1 <= n <= self.max_new_tokens or p < 0:
                raise ValueError(f"bad item ({g}, {p}, {n}) for max_new_tokens={self.max_new_tokens}")

    @classmethod
    def coerce(cls, trace: "Trace | Iterable[tuple[GroupId, int, int]]") -> "Trace":
        """Accept a Trace or a plain list of (group_id, prompt_tokens, length) triples."""
        if isinstance(trace, Trace):
            return trace
        items = [(g, int(p), int(n)) for g, p, n in trace]
        return cls(items, max_new_tokens=max((n for _, _, n in items), default=1))

    @property
    def lengths(self) -> list[int]:
        return [n for _, _, n in self.items]

    def to_seqs(self) -> list[Seq]:
        """Fresh Seq records; seq_id = index in `items` (the simulator's convention)."""
        return [
            Seq(i, g, p, self.max_new_tokens, prompt_ids=self.prompt_ids.get(g),
                prompt_features=self.prompt_features.get(g))
            for i, (g, p, _) in enumerate(self.items)
        ]


def synthetic_trace(
    kind: str = "lognormal",
    prompts: int = 64,
    group_size: int = 16,
    max_new_tokens: int = 1024,
    seed: int = 0,
    world_seed: int = 12345,
    median_length: float = 128.0,
    sigma_prompt: float = 0.8,
    sigma_within: float = 0.6,
    pareto_alpha: float = 1.5,
    n_topics: int = 8,
    vocab: int = 4096,
) -> Trace:
    """B = `prompts` groups x G = `group_size` samples with long-tailed, prompt-dependent lengths.

    The "world" (fixed by `world_seed`) has `n_topics` topics, each with its own favourite
    tokens and its own length scale; `seed` draws the prompts and samples. A prompt's median
    length = median_length * topic factor * (prompt length effect) * unexplained noise; samples
    spread around it by `kind`:
      * lognormal: L = median_b * exp(sigma_within * z)
      * pareto:    L = median_b * 2^(-1/alpha) * (1 - U)^(-1/alpha)   (Pareto, same median)
    Lengths are rounded and clipped to [1, max_new_tokens]. So lengths are learnable from the
    prompt tokens (topic), partly from the prompt length, and partly only from siblings.
    """
    if kind not in ("lognormal", "pareto"):
        raise ValueError(f"unknown kind {kind!r}; valid: lognormal, pareto")
    world = np.random.default_rng(world_seed)
    # topic log-scales spread over +-1.5 sigma_prompt; 32 favourite tokens per topic
    topic_shift = world.normal(0.0, sigma_prompt, n_topics)
    topic_tokens = world.integers(100, vocab, (n_topics, 32))
    rng = np.random.default_rng(seed)
    items: list[tuple[int, int, int]] = []
    prompt_ids: dict[int, tuple[int, ...]] = {}
    for b in range(prompts):
        topic = int(rng.integers(n_topics))
        plen = int(rng.integers(16, 320))
        n_topic = plen // 2  # half of the prompt speaks about its topic, half is generic text
        ids = np.concatenate(
            [rng.choice(topic_tokens[topic], n_topic), rng.integers(100, vocab, plen - n_topic)]
        )
        rng.shuffle(ids)
        prompt_ids[b] = tuple(int(t) for t in ids)
        log_med = (
            math.log(median_length)
            + topic_shift[topic]
            + 0.3 * math.log(plen / 100.0)
            + rng.normal(0.0, 0.3 * sigma_prompt)
        )
        if kind == "lognormal":
            raw = np.exp(log_med + sigma_within * rng.standard_normal(group_size))
        else:
            u = rng.random(group_size)
            raw = math.exp(log_med) * 2.0 ** (-1.0 / pareto_alpha) * (1.0 - u) ** (-1.0 / pareto_alpha)
        lengths = np.clip(np.rint(raw), 1, max_new_tokens).astype(int)
        items.extend((b, plen, int(n)) for n in lengths)
    meta = {"synthetic": kind, "seed": seed, "world_seed": world_seed}
    return Trace(items, max_new_tokens, prompt_ids, meta)


def save_trace(path: str | Path, trace: Trace) -> None:
    """Write `trace` in the JSON format above (groups in first-appearance order)."""
    groups: dict[GroupId, dict] = {}
    for g, p, n in trace.items:
        rec = groups.setdefault(g, {"group_id": g, "prompt_tokens": p, "lengths": []})
        if rec["prompt_tokens"] != p:
            raise ValueError(f"group {g!r} has two prompt lengths ({rec['prompt_tokens']}, {p})")
        rec["lengths"].append(n)
    for g, rec in groups.items():
        if g in trace.prompt_ids:
            rec["prompt_ids"] = list(trace.prompt_ids[g])
    doc = {
        "format": TRACE_FORMAT,
        "version": TRACE_VERSION,
        "max_new_tokens": trace.max_new_tokens,
        "meta": trace.meta,
        "groups": list(groups.values()),
    }
    Path(path).write_text(json.dumps(doc))


def load_trace(path: str | Path) -> Trace:
    """Read a JSON length trace; validates format, version and every length."""
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != TRACE_FORMAT or doc.get("version") != TRACE_VERSION:
        raise ValueError(f"{path}: not a {TRACE_FORMAT} v{TRACE_VERSION} file")
    items, prompt_ids = [], {}
    for rec in doc["groups"]:
        g = rec["group_id"]
        items.extend((g, int(rec["prompt_tokens"]), int(n)) for n in rec["lengths"])
        if rec.get("prompt_ids") is not None:
            prompt_ids[g] = tuple(int(t) for t in rec["prompt_ids"])
    return Trace(items, int(doc["max_new_tokens"]), prompt_ids, dict(doc.get("meta", {})))
