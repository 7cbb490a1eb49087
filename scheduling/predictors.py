"""Output-length predictors behind one interface.

Every predictor answers `predict(seq)` (expected total output length), `predict_remaining(seq)`
(expected tokens still to come given that `seq.generated` tokens exist already, >= 1) and learns
from `observe(seq, final_length)`. `begin_rollout()` marks a new training step: per-prompt
evidence is dropped, learned weights are kept.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from abc import ABC, abstractmethod
from typing import Callable, Mapping

import numpy as np

from .types import GroupId, Seq, SeqId

_SQRT2 = math.sqrt(2.0)


def _sf(z: float) -> float:
    """Standard normal survival function 1 - Phi(z), accurate in the far tail (erfc)."""
    return 0.5 * math.erfc(z / _SQRT2)


def lognormal_clipped_mean(mu: float, sigma: float, at_least: float, cap: float) -> float:
    """E[min(L, cap) | L > at_least] for log L ~ N(mu, sigma^2).

    The engine truncates at max_new_tokens (hence min with cap), and a running sequence that has
    produced g tokens is known to be longer than g (hence the conditioning): the longer it runs,
    the longer its expected total, which is how predictions are revised as tokens arrive.
    """
    if at_least >= cap:
        return cap
    sigma = max(sigma, 1e-6)
    la = math.log(at_least) if at_least > 0 else -math.inf
    lc = math.log(cap)
    p_alive = _sf((la - mu) / sigma)
    if p_alive < 1e-300:
        return min(cap, at_least + 1.0)  # far beyond the model's support: minimal extension
    m = math.exp(min(mu + 0.5 * sigma * sigma, 700.0))
    body = m * (_sf((la - mu - sigma * sigma) / sigma) - _sf((lc - mu - sigma * sigma) / sigma))
    tail = cap * _sf((lc - mu) / sigma)
    return min(cap, max(at_least, (body + tail) / p_alive))


class LengthPredictor(ABC):
    """Interface; all lengths are output tokens (prompt excluded)."""

    name: str = ""
    group_level: bool = False
    """True if predictions depend only on (group, prompt, generated), not on the seq_id:
    callers may then predict once per group and progress (cheaper)."""
    needs_prompt_features: bool = False
    """True if `Seq.prompt_features` must be set (the rollout worker then encodes prompts)."""

    @abstractmethod
    def predict(self, seq: Seq) -> float:
        """Expected total output length, in [1, seq.max_new_tokens]."""

    @abstractmethod
    def predict_remaining(self, seq: Seq) -> float:
        """Expected output tokens still to come given seq.generated; never below 1."""

    def remaining_quantile(self, seq: Seq, q: float) -> float:
        """q-quantile of the remaining tokens (>= 1). Default: the mean, for predictors without
        a spread (oracle, constant); schedulers use it to spot sequences that may run long."""
        return self.predict_remaining(seq)

    def observe(self, seq: Seq, final_length: int) -> None:
        """A sequence finished with `final_length` output tokens (learning hook)."""

    def begin_rollout(self) -> None:
        """A new training step starts: forget per-prompt evidence, keep learned parameters."""


class ConstantPredictor(LengthPredictor):
    """Baseline: every sequence is predicted `fraction * max_new_tokens` long."""

    name = "constant"
    group_level = True

    def __init__(self, fraction: float = 0.5) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def predict(self, seq: Seq) -> float:
        return max(1.0, self.fraction * seq.max_new_tokens)

    def predict_remaining(self, seq: Seq) -> float:
        guess = self.predict(seq)
        if seq.generated < guess:
            return max(1.0, guess - seq.generated)
        return max(1.0, 0.5 * (seq.max_new_tokens - seq.generated))  # overran: halfway to the cap


class OracleLengthPredictor(LengthPredictor):
    """Knows the true lengths (simulation only): the upper bound of what prediction can give."""

    name = "oracle"

    def __init__(self, lengths: Mapping[SeqId, int] | None = None) -> None:
        self.lengths: dict[SeqId, int] = dict(lengths or {})

    def set_lengths(self, lengths: Mapping[SeqId, int]) -> None:
        self.lengths = dict(lengths)

    def predict(self, seq: Seq) -> float:
        try:
            return float(self.lengths[seq.seq_id])
        except KeyError:
            raise KeyError(f"oracle has no true length for seq_id {seq.seq_id!r}") from None

    def predict_remaining(self, seq: Seq) -> float:
        return max(1.0, self.predict(seq) - seq.generated)


class TokenConditionedPredictor(LengthPredictor):
    """Online regression of log-length on prompt features + per-prompt evidence of this step.

    Model: log L = x(prompt) . theta + u_prompt + e, with u ~ N(0, tau^2) (what the prompt
    features miss) and e ~ N(0, s_w^2) (sample-to-sample spread within a group).
      * theta: recursive least squares (exact ridge solution, O(d^2) per observation) on
        x = [1, log(1 + prompt_tokens), hashed bag of prompt token ids (L2-normalized)].
      * Siblings that finished in this step give a conjugate normal update of the prompt's mean;
        this is what makes later micro-groups of a prompt well predicted.
      * s_w^2 is the pooled within-group variance, tau^2 = total residual variance - s_w^2,
        both estimated online.
    Predictions are lognormal means clipped to [1, max_new_tokens], conditioned on L > generated
    (see `lognormal_clipped_mean`). Caveat: siblings that finish first are the short ones, so
    early group evidence is biased low; the conditioning on `generated` corrects running ones.
    """

    name = "token_conditioned"
    group_level = True

    def __init__(
        self,
        n_hash: int = 64,
        ridge: float = 1.0,
        forgetting: float = 1.0,
        prior_log_length: float = math.log(64.0),
        prior_sigma: float = 1.0,
        stats_decay: float = 0.998,
    ) -> None:
        if n_hash < 1 or ridge <= 0 or not 0.9 <= forgetting <= 1.0 or prior_sigma <= 0:
            raise ValueError("need n_hash >= 1, ridge > 0, forgetting in [0.9, 1], prior_sigma > 0")
        self.n_hash = n_hash
        self.forgetting = forgetting
        # variance estimates follow the policy as it drifts over training: ~1/(1-decay) window
        self.stats_decay = stats_decay
        d = 2 + n_hash
        self.theta = np.zeros(d)
        self.theta[0] = prior_log_length  # bias starts at the prior guess
        self.P = np.eye(d) / ridge  # RLS inverse Gram matrix
        self.n_obs = 0
        # residual statistics (log space); priors count as a few pseudo-observations
        self._res_sq, self._res_n = prior_sigma**2 * 4.0, 4.0
        self._within_ss, self._within_dof = 0.5 * prior_sigma**2 * 4.0, 4.0
        self._groups: dict[GroupId, list[float]] = {}  # group -> [count, sum, sum of squares]
        self._feat_cache: dict[tuple[GroupId, int], np.ndarray] = {}

    # features -------------------------------------------------------------------------------
    def features(self, seq: Seq) -> np.ndarray:
        key = (seq.group_id, seq.prompt_tokens)
        x = self._feat_cache.get(key)
        if x is None:
            x = np.zeros(2 + self.n_hash)
            x[0] = 1.0
            x[1] = math.log1p(seq.prompt_tokens)
            if seq.prompt_ids:
                ids = np.asarray(seq.prompt_ids, dtype=np.uint64)
                # multiplicative hashing spreads nearby ids; the modulo picks a bucket
                buckets = ((ids * np.uint64(2654435761)) % np.uint64(2**32)) % np.uint64(self.n_hash)
                bag = np.bincount(buckets.astype(np.int64), minlength=self.n_hash).astype(float)
                x[2:] = bag / max(np.linalg.norm(bag), 1e-12)
            self._feat_cache[key] = x
        return x

    # variance components ----------------------------------------------------------------------
    @property
    def within_var(self) -> float:
        return self._within_ss / self._within_dof

    @property
    def prompt_var(self) -> float:
        return max(self._res_sq / self._res_n - self.within_var, 0.01)

    def _log_params(self, seq: Seq) -> tuple[float, float]:
        """Posterior predictive (mu, sigma) of log L for this sequence."""
        mu0 = float(self.features(seq) @ self.theta)
        tau2, sw2 = self.prompt_var, self.within_var
        g = self._groups.get(seq.group_id)
        if g is None or g[0] == 0:
            return mu0, math.sqrt(tau2 + sw2)
        k, total = g[0], g[1]
        post_var = 1.0 / (1.0 / tau2 + k / sw2)
        mu = post_var * (mu0 / tau2 + total / sw2)
        return mu, math.sqrt(post_var + sw2)

    # interface --------------------------------------------------------------------------------
    def predict(self, seq: Seq) -> float:
        mu, sigma = self._log_params(seq)
        return max(1.0, lognormal_clipped_mean(mu, sigma, 0.0, float(seq.max_new_tokens)))

    def predict_remaining(self, seq: Seq) -> float:
        mu, sigma = self._log_params(seq)
        total = lognormal_clipped_mean(mu, sigma, float(seq.generated), float(seq.max_new_tokens))
        return max(1.0, total - seq.generated)

    def remaining_quantile(self, seq: Seq, q: float) -> float:
        # P(L > x | L > g) = 1 - q  <=>  Sf(z_x) = (1 - q) * Sf(z_g) for the lognormal model
        mu, sigma = self._log_params(seq)
        g, cap = float(seq.generated), float(seq.max_new_tokens)
        p_alive = _sf((math.log(g) - mu) / sigma) if g > 0 else 1.0
        tail = (1.0 - q) * p_alive
        if tail <= 1e-300:
            return max(1.0, cap - g)
        x = math.exp(min(mu + sigma * NormalDist().inv_cdf(1.0 - tail), 700.0))
        return max(1.0, min(cap, x) - g)

    def observe(self, seq: Seq, final_length: int) -> None:
        y = math.log(max(1, int(final_length)))
        x = self.features(seq)
        err = y - float(x @ self.theta)  # a-priori residual: an honest estimate of total variance
        dec = self.stats_decay
        self._res_sq = self._res_sq * dec + err * err
        self._res_n = self._res_n * dec + 1.0
        lam = self.forgetting
        px = self.P @ x
        gain = px / (lam + float(x @ px))
        self.theta += gain * err
        self.P = (self.P - np.outer(gain, px)) / lam
        self.n_obs += 1
        g = self._groups.setdefault(seq.group_id, [0.0, 0.0, 0.0])
        if g[0] > 0:  # Welford-style pooled within-group sum of squares
            mean = g[1] / g[0]
            self._within_ss = self._within_ss * dec + (y - mean) ** 2 * g[0] / (g[0] + 1.0)
            self._within_dof = self._within_dof * dec + 1.0
        g[0] += 1.0
        g[1] += y
        g[2] += y * y

    def begin_rollout(self) -> None:
        self._groups.clear()
        self._feat_cache.clear()  # group ids may be reused for different prompts next step


class EntropyPooledPredictor(TokenConditionedPredictor):
    """EGTP + PLP: the token-conditioned model on the policy's own view of the prompt.

    Features x = [1, log(1 + prompt_tokens), scale * (f - center) / |f - center|], where f is
    the prompt's entropy-pooled hidden state (`Seq.prompt_features`, rollout/prompt_encoder.py)
    and center the mean f of the first `center_prompts` distinct prompts seen (a common
    direction that every hidden state shares would otherwise dominate the cosine geometry; it
    is frozen afterwards so the head's inputs stop moving). Hidden sizes above `max_dim` are
    reduced by a fixed random projection (the head is O(d^2) per observation).

    The head is the parent's: recursive least squares on log length, trained online from every
    finished sample, with the per-prompt evidence of finished siblings.

    PLP (progressive length prediction): the remaining length of a running sequence is
    predicted again at every plan, from the same posterior conditioned on the tokens it has
    produced (L > generated) and on its finished siblings; `length_aware`'s SJF refill, tail
    guard and optimistic projection all read `predict_remaining`, so every update reaches them.
    The hidden states of generated tokens are not used: vLLM does not return them, and
    re-encoding every running sequence with the worker's model copy would cost a forward pass
    over all running tokens per update.
    """

    name = "egtp"
    needs_prompt_features = True

    def __init__(self, max_dim: int = 1024, scale: float = 4.0, center_prompts: int = 64,
                 ridge: float = 0.1, seed: int = 0, **kw) -> None:
        self.max_dim, self.scale, self.center_prompts, self.seed = max_dim, scale, center_prompts, seed
        self._hidden: int | None = None
        self._proj: np.ndarray | None = None
        self._center_sum: np.ndarray | None = None
        self._center_n = 0
        self._centered_groups: set = set()
        super().__init__(n_hash=1, ridge=ridge, **kw)  # resized at the first prompt seen
        self._ridge = ridge

    def _setup(self, hidden: int) -> None:
        self._hidden = hidden
        dim = min(hidden, self.max_dim)
        if dim < hidden:
            rng = np.random.default_rng(self.seed)
            self._proj = rng.standard_normal((dim, hidden)) / math.sqrt(dim)
        d = 2 + dim
        bias = self.theta[0]
        self.n_hash = dim
        self.theta = np.zeros(d)
        self.theta[0] = bias
        self.P = np.eye(d) / self._ridge
        self._center_sum = np.zeros(hidden)

    def features(self, seq: Seq) -> np.ndarray:
        key = (seq.group_id, seq.prompt_tokens)
        x = self._feat_cache.get(key)
        if x is not None:
            return x
        if seq.prompt_features is None:
            raise ValueError("the egtp length predictor needs prompt features (Seq.prompt_features): "
                             "the rollout worker computes them with rollout.prompt_encoder.PromptEncoder; "
                             "use predictor token_conditioned where there is no model to encode prompts")
        f = np.asarray(seq.prompt_features, dtype=float).ravel()
        if self._hidden is None:
            self._setup(f.size)
        elif f.size != self._hidden:
            raise ValueError(f"prompt features of size {f.size}, the predictor was built for {self._hidden}")
        if self._center_n < self.center_prompts and key not in self._centered_groups:
            self._centered_groups.add(key)
            self._center_sum += f
            self._center_n += 1
        h = f - self._center_sum / max(self._center_n, 1)
        h = self.scale * h / max(float(np.linalg.norm(h)), 1e-12)
        z = self._proj @ h if self._proj is not None else h
        x = np.concatenate([[1.0, math.log1p(seq.prompt_tokens)], z])
        self._feat_cache[key] = x
        return x

    def begin_rollout(self) -> None:
        super().begin_rollout()
        self._centered_groups.clear()


_PREDICTORS: dict[str, Callable[..., LengthPredictor]] = {}


def register_predictor(name: str):
    """Class decorator filling the registry; a duplicate name is an error."""

    def deco(cls):
        if name in _PREDICTORS:
            raise ValueError(f"predictor {name!r} registered twice")
        _PREDICTORS[name] = cls
        return cls

    return deco


for _cls in (TokenConditionedPredictor, EntropyPooledPredictor, OracleLengthPredictor, ConstantPredictor):
    register_predictor(_cls.name)(_cls)


def predictor_names() -> list[str]:
    return sorted(_PREDICTORS)


def make_predictor(name: str, **kw) -> LengthPredictor:
    """Build a predictor by registry name (`token_conditioned`, `egtp`, `oracle`, `constant`)."""
    if name not in _PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}; valid names: {', '.join(predictor_names())}")
    return _PREDICTORS[name](**kw)
