"""The `rollout` section of the config and its `scheduler` (Infinite Sampling admission
control): part of the one schema of rl/config.py, which composes and re-exports it; split out
because the scheduler's keys and their per-policy checks are a job of their own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rl.config_checks import _choice, _positive
from rl.errors import ConfigError

# Which scheduler keys each policy reads (rollout.scheduler.<key>); a key set for a policy that
# does not read it is an error (SchedulerConfig.check_keys). kv_budget_tokens is not listed:
# it sizes the engine's KV cache, whatever the policy.
POLICY_KEYS = {
    "micro_group_size": ("naive_micro", "continuous", "length_aware"),
    "slots": ("naive_micro", "continuous", "length_aware"),
    "fptas_eps": ("length_aware",),
    "predictor": ("length_aware",),
    "regroup_fraction": ("length_aware",),
    "tail_guard": ("length_aware",),
    "admission": ("length_aware",),
    "admission_horizon": ("length_aware",),
    "preemption": ("length_aware",),
}


@dataclass
class SchedulerConfig:
    """Infinite Sampling admission control inside each rollout worker.

    Keys that only some policies read (POLICY_KEYS) default to null, which means "this policy's
    own default": a key left at null is never an error, one set for a policy that does not read
    it is (null is how "not set" is told apart from "set to the default value")."""

    policy: str = "length_aware"
    """Admission policy: full_group | naive_micro | continuous | length_aware (see scheduling/).
    length_aware packs by predicted length under the KV budget; its learned predictor lives in
    the rollout worker and keeps learning across steps."""
    micro_group_size: int | None = None
    """g, samples per micro sampling group, 1 <= g <= group_size: a group of G samples is decoded
    in ceil(G / g) rounds of g, and at most g sequences are decoded at once (the engine holds g
    sequences' KV, whatever G). naive_micro: one micro-group per round, the next round when it
    has finished; continuous: g slots, a freed slot takes the next sample, across groups;
    length_aware: rounds of at most g planned by FPTAS, refilled by SJF, within the KV budget.
    null: group_size for naive_micro and continuous, no cap for length_aware (its KV budget
    bounds it)."""
    kv_budget_tokens: Any = None
    """KV-cache tokens of each rollout engine: the engine's cache is allocated for this many
    (vLLM's num_gpu_blocks_override, GPU and CPU) and the policy fills at most this many. An
    integer (tokens per rollout worker); auto: kv_budget_fraction of the full-group demand of a
    worker's share of a step, ceil(data.prompts_per_step / rollout.workers) x group_size x
    (data.max_prompt_tokens + max_new_tokens); null: the engine's cache comes from
    gpu_memory_utilization and the budget is all of it."""
    kv_budget_fraction: float | None = None
    """kv_budget_tokens auto: the fraction (0, 1] of the full-group demand to allocate (0.5
    halves the rollout's KV memory); only with kv_budget_tokens: auto."""
    slots: int | None = None
    """Most sequences in flight at once; null = the engine's max_num_seqs (capped by
    micro_group_size)."""
    fptas_eps: float | None = None
    """length_aware: FPTAS accuracy, the packing is within (1 - eps) of optimal; null = 0.05."""
    predictor: str | None = None
    """length_aware: length predictor, token_conditioned | egtp | constant; null =
    token_conditioned. egtp regresses length on the policy's entropy-pooled hidden states of the
    prompt (rollout/prompt_encoder.py: a copy of the model in each rollout worker, one forward
    over each step's prompts, metric rollout/prompt_encoder_seconds)."""
    regroup_fraction: float | None = None
    """length_aware: how much is regrouped; a new FPTAS grouping (instead of an SJF refill)
    when at least this fraction of the KV budget is free, in (0, 1]; null = 0.5."""
    tail_guard: bool | None = None
    """length_aware: start the samples that may run longest early enough that they do not set
    the makespan (scheduling/length_aware.py); null = true."""

    admission: str | None = None
    """length_aware: optimistic | conservative. conservative reserves each sequence's whole
    predicted peak (prompt + predicted length) and never overruns the budget unless a sequence
    outlives its prediction; optimistic also admits while the KV projected over the next
    admission_horizon steps fits, and lets the engine preempt when sequences outgrow it;
    null = optimistic."""
    admission_horizon: int | None = None
    """length_aware, optimistic admission: decode steps of KV growth a new admission must leave
    room for; null = 16 (longer: fewer preemptions, emptier cache)."""
    preemption: str | None = None
    """length_aware: what vLLM preempts when sequences outgrow the cache. lifo: vLLM's own
    choice, the most recently scheduled request; predicted_longest: the longest predicted
    output (and its waiting queue served shortest predicted first); predicted_shortest: the
    shortest predicted (longest first). The predicted ones run vLLM's priority scheduling with
    the predicted length as priority; null = lifo."""

    def __post_init__(self):
        _choice("rollout.scheduler.policy", self.policy, ("full_group", "naive_micro", "continuous", "length_aware"))
        if self.predictor is not None:
            _choice("rollout.scheduler.predictor", self.predictor, ("token_conditioned", "egtp", "constant"))
        if self.fptas_eps is not None and not 0 < self.fptas_eps < 1:
            raise ConfigError(f"rollout.scheduler.fptas_eps = {self.fptas_eps} must be in (0, 1) (0.05 packs "
                              "within 5% of optimal).")
        if self.regroup_fraction is not None and not 0 < self.regroup_fraction <= 1:
            raise ConfigError(f"rollout.scheduler.regroup_fraction = {self.regroup_fraction} must be in (0, 1] "
                              "(the free share of the KV budget that triggers a new grouping; 0.5 is the default).")
        if self.slots is not None:
            _positive("rollout.scheduler.slots", self.slots)
        if self.admission is not None:
            _choice("rollout.scheduler.admission", self.admission, ("optimistic", "conservative"))
        if self.admission_horizon is not None:
            _positive("rollout.scheduler.admission_horizon", self.admission_horizon)
        if self.preemption is not None:
            _choice("rollout.scheduler.preemption", self.preemption,
                    ("lifo", "predicted_longest", "predicted_shortest"))
        self._check_budget()
        self.check_keys()
        self.budget_per_worker: int | None = self.kv_budget_tokens if isinstance(self.kv_budget_tokens, int) else None
        """KV tokens of each rollout engine with auto resolved (Config.__post_init__); None:
        sized from gpu_memory_utilization. Not a config key: derived, never written out."""

    def _check_budget(self) -> None:
        b, f = self.kv_budget_tokens, self.kv_budget_fraction
        if b is not None and b != "auto" and (isinstance(b, bool) or not isinstance(b, int) or b <= 0):
            raise ConfigError(f"rollout.scheduler.kv_budget_tokens = {b!r} is not valid: use a positive number of "
                              "KV tokens per rollout engine, auto (with rollout.scheduler.kv_budget_fraction), "
                              "or null (the engine's cache from gpu_memory_utilization).")
        if b == "auto":
            if f is None:
                raise ConfigError("rollout.scheduler.kv_budget_tokens = 'auto' needs "
                                  "rollout.scheduler.kv_budget_fraction, the share of the full-group demand to "
                                  "allocate, e.g. rollout.scheduler.kv_budget_fraction=0.5.")
            if not 0 < f <= 1:
                raise ConfigError(f"rollout.scheduler.kv_budget_fraction = {f} must be in (0, 1] (0.5 allocates half "
                                  "of the full-group demand).")
        elif f is not None:
            raise ConfigError(f"rollout.scheduler.kv_budget_fraction = {f} is only read with "
                              f"rollout.scheduler.kv_budget_tokens: auto (it is {b!r}); set kv_budget_tokens: auto "
                              "or remove kv_budget_fraction.")

    def check_keys(self) -> None:
        """A key that the chosen policy does not read is an error naming the policies that do."""
        for key, policies in POLICY_KEYS.items():
            value = getattr(self, key)
            if value is not None and self.policy not in policies:
                raise ConfigError(f"rollout.scheduler.{key} = {value!r} is not used by policy {self.policy!r}: "
                                  f"it is read by {', '.join(policies)}. Remove rollout.scheduler.{key}, or choose "
                                  f"one of those policies.")

    def worker_options(self, group_size: int) -> dict:
        """RolloutWorker keyword arguments (rl.actors.scheduler_options): policy, policy_kwargs,
        kv_budget_tokens and engine_kv_tokens (both `budget_per_worker`), slots, preemption. Keys left null
        take the policy's default here.

        Micro groups (g = micro_group_size): at most g sequences in flight, so a group of G is
        decoded in ceil(G / g) rounds of g. naive_micro packs micro-groups of g into g slots (one
        micro-group per round, the next when it has finished); continuous refills g slots FIFO
        across groups; length_aware plans rounds of at most g by FPTAS and refills them by SJF
        under the KV budget."""
        g = self.micro_group_size
        kwargs: dict = {}
        if self.policy in ("naive_micro", "continuous"):
            g = g or group_size
        if self.policy == "naive_micro":
            kwargs["micro_group_size"] = g
        elif self.policy == "length_aware":
            kwargs.update(predictor=self.predictor or "token_conditioned",
                          eps=self.fptas_eps if self.fptas_eps is not None else 0.05)
            kwargs.update({k: v for k, v in (("regroup_fraction", self.regroup_fraction),
                                             ("tail_guard", self.tail_guard),
                                             ("admission", self.admission),
                                             ("admission_horizon", self.admission_horizon))
                           if v is not None})
        slots = self.slots
        if g is not None:
            slots = min(slots, g) if slots else g
        budget = self.budget_per_worker
        return {"policy": self.policy, "policy_kwargs": kwargs, "kv_budget_tokens": budget,
                "engine_kv_tokens": budget, "slots": slots, "preemption": self.preemption or "lifo"}

    def resolve_budget(self, prompts_per_worker: int, group_size: int, sequence_tokens: int) -> None:
        """Set `budget_per_worker`: kv_budget_tokens, or with auto kv_budget_fraction x
        prompts_per_worker x group_size x sequence_tokens (the full-group demand of one
        worker's share: every sample at its longest prompt and response)."""
        if self.kv_budget_tokens == "auto":
            demand = prompts_per_worker * group_size * sequence_tokens
            self.budget_per_worker = max(1, int(self.kv_budget_fraction * demand))
        else:
            self.budget_per_worker = self.kv_budget_tokens
        if self.budget_per_worker is not None and self.budget_per_worker < sequence_tokens:
            raise ConfigError(f"rollout.scheduler.kv_budget_tokens = {self.kv_budget_tokens!r} gives each rollout "
                              f"engine {self.budget_per_worker} KV tokens, less than one sequence of "
                              f"data.max_prompt_tokens + rollout.max_new_tokens = {sequence_tokens}: raise it (or "
                              "kv_budget_fraction) to at least that.")


@dataclass
class RolloutConfig:
    workers: int = 1
    """Number of rollout actors, each owning one vLLM engine; a step's prompts are split among them."""
    group_size: int = 8
    """Samples per prompt (G)."""
    max_new_tokens: int = 128
    """Longest response, in tokens."""
    temperature: float = 1.0
    """Sampling temperature (the learner scores tokens at the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    gpu_memory_utilization: float = 0.3
    """GPU: fraction of GPU memory for vLLM. CPU: fraction of the NUMA node's RAM for weights + KV cache."""
    enforce_eager: bool = True
    """Skip torch.compile / CUDA graphs: a much faster engine start-up, especially on CPU."""
    seed: int | None = None
    """Engine seed; null derives it from trainer.seed and the worker index."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Infinite Sampling admission control inside each worker."""
    weight_sync: str = "auto"
    """How new weights reach the engines every step: object_store (one flat buffer through Ray's shared-memory object store; the CPU path), broadcast (bucketed collective broadcast from learner rank 0 through vLLM's weight-transfer API: NCCL on GPU, gloo on CPU), auto (broadcast when every rollout and learner actor gets a GPU of its own, else object_store: NCCL cannot join two actors sharing one GPU)."""
    weight_bucket_mb: float = 256.0
    """broadcast: MiB per bucket (two buckets in flight on the sender, one being loaded per engine)."""
    partial: bool = False
    """Partial rollouts (with trainer.max_staleness >= 1): a weight update does not wait for the
    longest sequences of the rollouts in flight; they are aborted at the next engine step and
    resumed from their prefixes under the new weights (each token records its weights version).
    No effect in the synchronous loop, where no rollout is in flight at a sync."""

    def __post_init__(self):
        _choice("rollout.weight_sync", self.weight_sync, ("auto", "object_store", "broadcast"))
        if self.weight_bucket_mb * 2**20 < 1:
            raise ConfigError(f"rollout.weight_bucket_mb = {self.weight_bucket_mb} must be > 0 (MiB per broadcast "
                              "bucket; 256 is a good size).")
        _positive("rollout.workers", self.workers)
        _positive("rollout.group_size", self.group_size)
        g = self.scheduler.micro_group_size
        if g is not None and (isinstance(g, bool) or not 1 <= g <= self.group_size):
            raise ConfigError(f"rollout.scheduler.micro_group_size = {g} must be in [1, rollout.group_size = "
                              f"{self.group_size}]: a group of G samples is decoded in ceil(G / g) rounds of g; "
                              "null uses the policy's default.")
        _positive("rollout.max_new_tokens", self.max_new_tokens)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p = {self.top_p} is out of range: use a value in (0, 1].")
        if self.temperature <= 0:
            raise ConfigError(f"rollout.temperature = {self.temperature} must be > 0 for RL sampling.")
