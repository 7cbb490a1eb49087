"""Typed configuration: the one schema of a run.

The dataclasses here (the `reward` section's live in rewards/config.py, next to the code that
reads it, and the `rollout` section's in rl/config_rollout.py) are the only schema: YAML and `key=value` overrides are merged onto
`OmegaConf.structured(Config)`, which types them, and then built into the dataclasses, whose
`__post_init__` checks each field where it is declared. Actors receive these sections as they
are. Every field has a one-line docstring (the string under it). Batch sizes say what they count
in their name: `prompts_per_step` counts prompts, `group_size` samples per prompt, so a step
trains on `prompts_per_step * group_size` sequences.

Errors are `ConfigError`: one paragraph naming the field, the value and the fix, raised
before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rewards.config import RewardConfig, RewardFunctionConfig  # noqa: F401 (the reward section, re-exported)
from rl.config_checks import _choice, _positive
from rl.config_rollout import POLICY_KEYS, RolloutConfig, SchedulerConfig  # noqa: F401 (the rollout section)
from rl.errors import ConfigError


@dataclass
class LoraConfig:
    rank: int = 0
    """LoRA rank; 0 trains all weights (full fine-tuning)."""
    alpha: float = 32.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Names of the linear layers that get adapters."""


@dataclass
class ModelConfig:
    path: str = "demo:SmolLM2-135M-Instruct"
    """Hugging Face directory or hub name; `demo:SmolLM2-135M-Instruct` is the bundled demo model."""
    dtype: str = "bfloat16"
    """Rollout weights dtype and learner autocast dtype: bfloat16 | float16 | float32 (master weights stay float32)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (rank 0 = off)."""

    def __post_init__(self):
        _choice("model.dtype", self.dtype, ("bfloat16", "float16", "float32"))


@dataclass
class DataConfig:
    path: str = "builtin:arithmetic"
    """Local .jsonl/.json/.parquet/.csv file or directory, a hub dataset name, `builtin:arithmetic`,
    or `builtin:mixed` (open-ended instructions alternating with arithmetic: long, varied
    response lengths, for Infinite Sampling)."""
    split: str = "train"
    """Dataset split to train on."""
    prompt_key: str = "prompt"
    """Column with the prompt: a string, or a list of chat messages."""
    answer_key: str | None = "answer"
    """Column with the reference answer, passed to reward functions (null: none)."""
    prompts_per_step: int = 8
    """Prompts drawn per training step (each sampled `rollout.group_size` times)."""
    max_prompt_tokens: int = 256
    """Prompts longer than this (after the chat template) are dropped, with a count in the log."""
    system_prompt: str | None = None
    """System message prepended when the chat template is applied."""
    apply_chat_template: bool = True
    """Apply the tokenizer's chat template when it has one."""
    shuffle: bool = True
    """Shuffle once per epoch (seeded by trainer.seed)."""
    eval_path: str | None = None
    """Held-out prompts for evaluation (same forms as `path`; `builtin:arithmetic` with
    eval_split test is the quickstart's); null: no evaluation."""
    eval_split: str = "test"
    """Split of eval_path."""

    def __post_init__(self):
        _positive("data.prompts_per_step", self.prompts_per_step)
        _positive("data.max_prompt_tokens", self.max_prompt_tokens)


@dataclass
class ObjectiveConfig:
    name: str = "grpo"
    """Objective registered in rl.objectives (grpo, dr_grpo, dapo, gspo, fgo, hapo, dhpo)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Its hyperparameters; written in YAML next to `name` (e.g. `objective.eps_high: 0.28`)."""

    def __post_init__(self):
        from rl.objectives import OBJECTIVES, get_objective, objective_defaults

        if self.name not in OBJECTIVES:
            raise ConfigError(f"objective.name = {self.name!r} is not registered. "
                              f"Valid objectives: {', '.join(OBJECTIVES)}.")
        self.params = dict(self.params)
        valid = objective_defaults(self.name)
        for key in self.params:
            if key not in valid:
                raise ConfigError(f"Unknown key objective.{key} for objective {self.name!r}. "
                                  f"Valid keys: name, {', '.join(valid)}.")
        try:
            get_objective(self.name, **self.params)
        except ValueError as e:
            raise ConfigError(f"objective: {e}") from None

    def build(self):
        """The objective object (rl.objectives.Objective) this section describes."""
        from rl.objectives import get_objective

        return get_objective(self.name, **self.params)


@dataclass
class BehaviorCorrectionConfig:
    """Off-policy correction between the behavior policy (the rollout engine's log-probs, which
    come with every sample) and the proximal policy (the learner at the start of the step):
    decoupled PPO, each token's policy loss times min(w, cap) (truncate) or w·[w <= cap] (mask),
    w = exp(prox - behav). docs/ALGORITHMS.md, "PPO epochs, mini-batches and off-policy
    correction"; the behavior/* metrics are logged in every mode.

    Default mode truncate: it is the objective that is right whatever the staleness
    (trainer.max_staleness) and whatever the numeric gap between engine and learner, and costs
    no extra forward pass when the learner takes one optimizer step per batch (the training
    forward's detached log-probs are the proximal ones then). Synchronous runs see weights within
    a few percent of 1, so it changes them little; an off-policy run that forgot to turn it on
    would train on a biased gradient. mode none with ppo_epochs 1 and mini_batches 1 is the
    former update, bit for bit."""

    mode: str = "truncate"
    """truncate (truncated importance sampling, min(w, cap)) | mask (tokens with w > cap get
    weight 0, the others w) | none (no correction: weight 1)."""
    cap: float = 2.0
    """C: the largest importance weight a token keeps (truncate) or the weight above which it is
    dropped (mask); > 0."""

    def __post_init__(self):
        _choice("learner.behavior_correction.mode", self.mode, ("truncate", "mask", "none"))
        if not self.cap > 0:
            raise ConfigError(f"learner.behavior_correction.cap = {self.cap} must be > 0: it is the largest "
                              "importance weight a token keeps (2.0 is a common choice); to turn the correction "
                              "off, set learner.behavior_correction.mode: none.")


@dataclass
class LearnerConfig:
    workers: int = 1
    """Data-parallel learner actors (gloo on CPU, nccl on GPU)."""
    lr: float = 1e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer steps."""
    micro_batch_tokens: int = 4096
    """Token budget of one micro-batch (prompt + response tokens, packed without padding waste)."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    layout: str = "auto"
    """Micro-batch layout: auto (shared_prompt on CPU; padded on GPU, under gradient_checkpointing
    and under fsdp) |
    shared_prompt (each distinct prompt runs once per update and its KV cache serves its
    group's samples, whose responses run in padded micro-batches; needs the KV cache, so not
    with gradient checkpointing) | padded (length-sorted rectangles, DP-grouped) | packed (one
    row per micro-batch, no padding, block-diagonal mask; slower than padded with CPU
    attention kernels, meant for flash_attention_2 on GPU). Measured: docs/BENCHMARKS.md."""
    attn_implementation: str = "auto"
    """transformers attention kernel of the learner: auto (eager on CPU, faster than sdpa
    here on short sequences; sdpa on GPU) | eager | sdpa | flash_attention_2."""
    packed_row_tokens: int = 256
    """Longest packed row (packed layout): CPU attention computes the full S x S scores."""
    strategy: str = "replicate"
    """How data-parallel learners hold the model: replicate (every rank the whole model and
    AdamW state, gradients all-reduced; fastest when it fits) | fsdp (torch FSDP2: weights,
    gradients and AdamW state sharded across the ranks, layers gathered as they run; layout
    padded or packed, no LoRA)."""
    ppo_epochs: int = 1
    """Passes over each step's batch; every pass takes one optimizer step per mini-batch, in the
    same mini-batch order each epoch. > 1 reuses the batch (PPO): the proximal log-probs are then
    computed once per step, before the first update, and the clip keeps later passes near them."""
    mini_batches: int = 1
    """Optimizer steps per epoch: the step's prompt groups are split (whole groups, by the
    driver) into this many mini-batches, each normalized by its own token and sequence counts;
    at most data.prompts_per_step. A step takes ppo_epochs * mini_batches optimizer steps."""
    behavior_correction: BehaviorCorrectionConfig = field(default_factory=BehaviorCorrectionConfig)
    """Off-policy correction between the rollout engine's and the learner's policy (mode, cap)."""

    def __post_init__(self):
        _choice("learner.strategy", self.strategy, ("replicate", "fsdp"))
        if isinstance(self.ppo_epochs, bool) or self.ppo_epochs < 1:
            raise ConfigError(f"learner.ppo_epochs = {self.ppo_epochs} must be an integer >= 1: the passes over "
                              "each step's batch (1 = one pass, the usual GRPO update).")
        if isinstance(self.mini_batches, bool) or self.mini_batches < 1:
            raise ConfigError(f"learner.mini_batches = {self.mini_batches} must be an integer >= 1: the "
                              "optimizer steps per epoch (1 = one step on the whole batch).")
        if self.strategy == "fsdp" and self.layout == "shared_prompt":
            raise ConfigError("learner.layout = 'shared_prompt' does not run under learner.strategy = 'fsdp' "
                              "(its two passes per chunk would need matching collectives on every rank); "
                              "use learner.layout: auto (padded) or packed.")
        _positive("learner.workers", self.workers)
        _positive("learner.micro_batch_tokens", self.micro_batch_tokens)
        _choice("learner.layout", self.layout, ("auto", "shared_prompt", "padded", "packed"))
        _choice("learner.attn_implementation", self.attn_implementation,
                ("auto", "eager", "sdpa", "flash_attention_2"))
        if self.layout == "shared_prompt" and self.gradient_checkpointing:
            raise ConfigError("learner.layout = 'shared_prompt' needs the KV cache, which "
                              "learner.gradient_checkpointing = true turns off; set "
                              "learner.layout: padded, or turn gradient checkpointing off.")
        if self.lr <= 0:
            raise ConfigError(f"learner.lr = {self.lr} must be > 0.")

    @property
    def resolved_layout(self) -> str:
        """`layout` with auto decided: shared_prompt, except padded under gradient checkpointing
        (which turns the KV cache off) and under fsdp (two passes per chunk would need matching
        collectives on every rank)."""
        if self.layout != "auto":
            return self.layout
        if self.gradient_checkpointing or self.strategy == "fsdp" or _cuda_available():
            # On a GPU the shared prompt pass saves tokens but not time (measured on an H200:
            # docs/BENCHMARKS.md), and padded micro-batches run at a higher rate.
            return "padded"
        return "shared_prompt"


@dataclass
class TrainerConfig:
    total_steps: int = 20
    """Training steps (one rollout batch and one optimizer update each)."""
    output_dir: str = "outputs/run"
    """Where metrics.jsonl, TensorBoard events, curves.png, config.yaml and checkpoints go."""
    checkpoint_every: int = 10
    """Save a checkpoint every this many steps (0: only at the end)."""
    resume_from: str | None = None
    """Checkpoint directory (…/checkpoints/step_N) to continue from."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    sync_tolerance: float | None = None
    """Max |log-prob difference| (canary tokens) between learner and rollout after a sync, a quarter of it for the mean; null: 1e-3 in float32, 1.0 in 16-bit."""
    canary_prompt: str = "Count from one to ten:"
    """Prompt whose sampled continuation is scored by both sides to verify every weight sync."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    """Metrics trackers: jsonl (always on), tensorboard, wandb, mlflow (wandb/mlflow: `pip install 'rl-infinite[trackers]'`)."""
    max_skipped_steps: int = 3
    """Non-finite guard: a step whose loss or gradient norm is NaN/inf is not applied (counted in
    faults/skipped_steps, its samples in output_dir/bad_steps/step_N.jsonl); after this many in
    a row the run stops."""
    eval_every: int = 0
    """Evaluate on data.eval_path before the first step, every this many steps and at the end
    (0: never); results go into the row of the step after which they ran (the pre-training one
    into step 1's) and into eval.jsonl."""
    max_staleness: Any = 0
    """How many weight versions a trained sample may lag the learner: 0 = synchronous (generate,
    then train); k >= 1 = the next k steps' rollouts run while the learner trains; `auto` = k
    chosen each step (rl/staleness.py) between 0 and auto_staleness_max."""
    auto_staleness_min_ess: float = 0.5
    """max_staleness auto: lower k when behavior/ess_fraction falls below this."""
    auto_staleness_max: int = 4
    """max_staleness auto: the largest k it may choose."""
    actor_timeout_s: float = 120.0
    """A rollout or learner actor that leaves a liveness probe unanswered this long (hung,
    stopped) is killed and treated as lost, like one that died (rl/supervision.py). Long calls
    are not cut short: the probe is answered while a rollout or update runs."""
    max_restarts: int = 3
    """Lost actors replaced in one run (rollout workers replaced, learners rebuilt from the newest
    checkpoint; faults/rollout_restarts, faults/learner_restarts); one more stops the run with
    the resume command."""
    save_rollouts: bool = False
    """Write every step's samples (prompt and response ids, text, log-probs, reward) to
    output_dir/rollouts/step_N.jsonl."""

    def __post_init__(self):
        if self.actor_timeout_s <= 0:
            raise ConfigError(f"trainer.actor_timeout_s = {self.actor_timeout_s} must be > 0 (seconds an actor may "
                              "leave a liveness probe unanswered; 120 is a good default).")
        if self.max_restarts < 0:
            raise ConfigError(f"trainer.max_restarts = {self.max_restarts} must be >= 0 (0: any lost actor stops "
                              "the run).")
        if self.max_staleness != "auto" and (isinstance(self.max_staleness, bool)
                                             or not isinstance(self.max_staleness, int) or self.max_staleness < 0):
            raise ConfigError(f"trainer.max_staleness = {self.max_staleness!r} is not valid: use an integer >= 0 "
                              "(0 = synchronous, 1 = one-step off-policy) or auto.")
        if not 0 < self.auto_staleness_min_ess <= 1:
            raise ConfigError(f"trainer.auto_staleness_min_ess = {self.auto_staleness_min_ess} must be in (0, 1].")
        _positive("trainer.auto_staleness_max", self.auto_staleness_max)
        from rl.metrics import check_loggers

        self.loggers = check_loggers(self.loggers)  # known names, installed packages; jsonl first


@dataclass
class EvalConfig:
    samples_per_prompt: int = 4
    """Samples per held-out prompt (k of pass@k)."""
    temperature: float = 1.0
    """Sampling temperature of the evaluation."""
    max_prompts: int = 64
    """Held-out prompts evaluated each time (the first ones, in a fixed order)."""
    pass_threshold: float = 1.0
    """A sample passes when its reward is at least this (the arithmetic reward gives 1.0 for a
    right answer)."""

    def __post_init__(self):
        _positive("eval.samples_per_prompt", self.samples_per_prompt)
        _positive("eval.max_prompts", self.max_prompts)
        if self.temperature < 0:
            raise ConfigError(f"eval.temperature = {self.temperature} must be >= 0.")


@dataclass
class RayConfig:
    address: str | None = None
    """Ray cluster address; null uses RAY_ADDRESS when set, else starts a local Ray."""
    num_cpus: int | None = None
    """CPUs a local Ray may use (null: all)."""
    loopback_only: bool = True
    """A local Ray (no address) listens on 127.0.0.1 only, so no other machine can reach it; false binds its ports on every interface (Ray's default; see docs/CLUSTER.md)."""
    rollout_resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray custom resources added to each rollout actor's request, e.g. {rollout_node: 1} to run them on nodes started with `ray start --resources '{"rollout_node": 4}'`."""
    learner_resources: dict[str, float] = field(default_factory=dict)
    """The same for each learner actor."""
    placement_strategy: str = "PACK"
    """The Ray placement group of the run's actors (one bundle per actor, rl/placement.py): PACK (as few nodes as possible), SPREAD (as many as possible), STRICT_SPREAD (each actor on a node of its own)."""
    placement_timeout_s: float = 120.0
    """How long to wait for Ray to reserve the placement group before stopping with what was asked and what the cluster has (raise it while autoscaled nodes join)."""

    def __post_init__(self):
        _choice("ray.placement_strategy", self.placement_strategy, PLACEMENT_STRATEGIES)
        if self.placement_timeout_s <= 0:
            raise ConfigError(f"ray.placement_timeout_s = {self.placement_timeout_s} must be > 0 (seconds to wait "
                              "for the cluster to reserve the actors' resources).")
        for name in ("rollout_resources", "learner_resources"):
            for key, amount in getattr(self, name).items():
                if key in ("CPU", "GPU", "memory", "object_store_memory"):
                    raise ConfigError(f"ray.{name} = {dict(getattr(self, name))}: {key!r} is one of Ray's built-in "
                                      "resources, which rl/actors.py sets per actor (one GPU each, or a share); list "
                                      "only custom resources here, e.g. {rollout_node: 1}.")
                if not amount > 0:
                    raise ConfigError(f"ray.{name}.{key} = {amount} must be > 0: each actor asks for that much of "
                                      f"{key!r}; remove the key to ask for none.")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        # Checks that span two sections; each section checks its own fields.
        r = self.rollout
        r.scheduler.resolve_budget(-(-self.data.prompts_per_step // r.workers), r.group_size,
                                   self.data.max_prompt_tokens + r.max_new_tokens)
        if self.trainer.eval_every < 0:
            raise ConfigError(f"trainer.eval_every = {self.trainer.eval_every} must be >= 0 (0: no evaluation).")
        if self.trainer.eval_every and not self.data.eval_path:
            raise ConfigError(f"trainer.eval_every = {self.trainer.eval_every} but data.eval_path is null: name the "
                              "held-out prompts (e.g. data.eval_path: builtin:arithmetic with data.eval_split: test), "
                              "or set trainer.eval_every: 0.")
        if self.learner.mini_batches > self.data.prompts_per_step:
            raise ConfigError(f"learner.mini_batches = {self.learner.mini_batches} is larger than "
                              f"data.prompts_per_step = {self.data.prompts_per_step}: a mini-batch holds whole "
                              "prompt groups, so a step has at most data.prompts_per_step of them; lower "
                              "learner.mini_batches or raise data.prompts_per_step.")
        if self.learner.strategy == "fsdp" and self.model.lora.rank > 0:
            raise ConfigError(f"learner.strategy = 'fsdp' with model.lora.rank = {self.model.lora.rank}: LoRA "
                              "adapters are small enough to replicate; use learner.strategy: replicate with LoRA.")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Reading and writing configs (rl/config_loading.py); imported here so that callers keep
# `from rl.config import load_config, config_to_dict`.
from rl.config_loading import config_to_dict, load_config  # noqa: E402
