"""Ray actor shells around the plain worker classes, and the groups the driver talks to."""

from __future__ import annotations

import dataclasses
import os

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from rl.config import Config, RolloutConfig
from rl.learner import Learner, TrainBatch
from rl.node_paths import require_on_this_node
from rl.placement import placement_options
from rollout.records import RolloutResult, SampleRequest
from rl.supervision import ActorLost, Watched, get_started, supervised_get
from rollout.worker import RolloutWorker

# Actor environment: quiet vLLM, no tokenizer thread pools fighting the model for 2 cores.
# Weight-loading bars and library deprecation warnings from every actor would bury the
# driver's own progress bar and per-step lines.
ACTOR_ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false",
             "RAY_DEDUP_LOGS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
             "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning"}


def _actor_options(config: Config) -> dict:
    """Resources of one rollout or learner actor.

    GPUs: one per worker when the cluster has enough; otherwise the workers share the GPUs in
    equal fractions (rollout and learner colocated; keep rollout.gpu_memory_utilization low
    enough to leave the learner room). CPU-only: the phases of a step run one after another,
    so actors reserve no CPUs and share all cores.
    """
    gpus = ray.cluster_resources().get("GPU", 0)
    if not gpus:
        return {"num_cpus": 0}
    needed = config.rollout.workers + config.learner.workers
    return {"num_gpus": 1 if gpus >= needed else gpus / needed, "num_cpus": 1}


def weight_sync_method(config: Config) -> str:
    """`rollout.weight_sync` with auto resolved.

    broadcast (NCCL) when every rollout and learner actor has a GPU of its own: the weights
    then never leave GPU memory. object_store otherwise: on CPU it is the faster path, and
    actors that share a GPU cannot form an NCCL group (NCCL refuses two ranks on one device),
    so colocated weights go through host memory.
    """
    method = config.rollout.weight_sync
    if method == "auto":
        gpus = ray.cluster_resources().get("GPU", 0)
        own_gpu_each = gpus >= config.rollout.workers + config.learner.workers
        return "broadcast" if gpus and own_gpu_each else "object_store"
    return method


@ray.remote(concurrency_groups={"control": 1})
class RolloutActor(RolloutWorker):
    """A RolloutWorker in its own process, built from the config's `rollout` section.

    Its calls run one at a time in the order they were submitted (the default group has one
    thread), except `interrupt`, which runs on its own thread so that it can reach a rollout in
    flight.

    Args:
        model_path: the resolved model directory (`model.path` after demo/hub resolution).
        rollout: the config's `rollout` section, as it is.
        dtype: `model.dtype`.
        max_model_len: prompt + response tokens (data.max_prompt_tokens + rollout.max_new_tokens).
        seed: this engine's seed.
        logits_processors: the objective's vLLM processor classes (HAPO), or None.
        weight_broadcast: receive weights by collective broadcast (rollout.weight_sync resolved).
    """

    def __init__(self, model_path: str, rollout: RolloutConfig, *, dtype: str, max_model_len: int, seed: int,
                 logits_processors: list | None = None, weight_broadcast: bool = False):
        require_on_this_node({"model.path": model_path})
        super().__init__(model_path, dtype=dtype, max_model_len=max_model_len,
                         gpu_memory_utilization=rollout.gpu_memory_utilization, seed=seed,
                         enforce_eager=rollout.enforce_eager, logits_processors=logits_processors,
                         weight_broadcast=weight_broadcast, **scheduler_options(rollout))

    def ready(self) -> bool:
        return True

    def where(self) -> dict:
        return _where()

    @ray.method(concurrency_group="control")
    def interrupt(self) -> None:
        RolloutWorker.interrupt(self)

    @ray.method(concurrency_group="control")
    def ping(self) -> bool:
        """Liveness probe (rl/supervision.py), answered while a rollout runs."""
        return True


@ray.remote(concurrency_groups={"control": 1})
class LearnerActor(Learner):
    """A Learner (one data-parallel rank) in its own process. Its calls run one at a time, in
    order, except `ping`, which has a thread of its own so that it answers while an update runs."""

    def __init__(self, model, *args, init_weights_path: str | None = None, **kwargs):
        require_on_this_node({"model.path": model.path, "checkpoint to load (init_weights_path)": init_weights_path})
        super().__init__(model, *args, init_weights_path=init_weights_path, **kwargs)

    def where(self) -> dict:
        return _where()

    @ray.method(concurrency_group="control")
    def ping(self) -> bool:
        """Liveness probe (rl/supervision.py), answered while an update runs."""
        return True


def _where() -> dict:
    """This actor's node as Ray reports it, its process id (what `ps` and `kill` take) and the
    threads its torch runs on (Ray sets OMP_NUM_THREADS=1 in actors that reserve no CPU; the
    workers raise it to the cores they may use, and this shows that they did)."""
    import torch

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "torch_threads": torch.get_num_threads()}


def placement(rollout: "RolloutGroup", learners: "LearnerGroup") -> dict:
    """{"rollout": [{rank, node_id, node_ip, num_cpus, num_gpus}, ...], "learner": [...]}:
    where every actor runs and what it reserved (written to output_dir/placement.json)."""
    out = {}
    for name, group in (("rollout", rollout), ("learner", learners)):
        nodes = get_started([w.where.remote() for w in group.workers], f"the {name} actors")
        out[name] = [{"rank": i, **node, "num_cpus": group.options.get("num_cpus", 0),
                      "num_gpus": group.options.get("num_gpus", 0)} for i, node in enumerate(nodes)]
    return out


def scheduler_options(rollout: RolloutConfig) -> dict:
    """RolloutWorker keyword arguments for `rollout.scheduler` (`SchedulerConfig.worker_options`:
    the policy, its options, the KV budget that also sizes the engine, the slots)."""
    return rollout.scheduler.worker_options(rollout.group_size)


@dataclasses.dataclass
class RolloutCall:
    """One worker's share of a submitted rollout call, kept so that it can be re-issued."""

    index: int
    actor: object
    """The worker it was sent to (a replacement is a different actor)."""
    method: str
    args: tuple
    kwargs: dict
    ref: object


class RolloutGroup:
    """Rollout workers; a step's prompts are split among them by whole groups."""

    def __init__(self, config: Config, model_path: str, seed: int, logits_processors=None):
        r = config.rollout
        self.partial = r.partial
        self.options = opts = _actor_options(config)
        max_model_len = config.data.max_prompt_tokens + r.max_new_tokens
        env = dict(ACTOR_ENV)
        if logits_processors:
            # vLLM's V2 model runner (picked on GPUs with Triton) rejects V1-interface processors.
            env["VLLM_USE_V2_MODEL_RUNNER"] = "0"

        def spawn(i: int):
            return RolloutActor.options(**opts, **placement_options(config, "rollout", i, opts),
                                        runtime_env={"env_vars": env}).remote(
                model_path, r, dtype=config.model.dtype, max_model_len=max_model_len,
                seed=(r.seed if r.seed is not None else seed) + 1000 * i, logits_processors=logits_processors,
                weight_broadcast=weight_sync_method(config) == "broadcast")

        self._spawn = spawn
        self.timeout_s = config.trainer.actor_timeout_s
        self.on_lost = None
        """Set by the trainer: on_lost(index, cause) replaces worker `index` (`respawn`) and
        brings the new engine to the learner's weights; without it a lost worker is an error."""
        self.workers = [spawn(i) for i in range(r.workers)]
        get_started([w.ready.remote() for w in self.workers], "the rollout workers")

    def respawn(self, index: int):
        """A new worker `index` with the same resources, arguments and seed as the lost one;
        returned once its engine is up (it still has model.path's weights)."""
        ray.kill(self.workers[index], no_restart=True)  # may still be alive, e.g. hung
        self.workers[index] = self._spawn(index)  # in place: WeightSync shares this list
        get_started([self.workers[index].ready.remote()], f"the replacement of rollout worker {index}")
        return self.workers[index]

    def submit(self, requests: list[SampleRequest], **sampling) -> list[RolloutCall]:
        """Start sampling `requests` (split among the workers by whole groups); returns at once.
        Each worker runs its calls in the order they were submitted, so a generation submitted
        after a weight load samples with the loaded weights. With rollout.partial the rollout
        can be interrupted by a weight update (`interrupt`)."""
        shards = [requests[i::len(self.workers)] for i in range(len(self.workers))]
        seed = sampling.pop("seed", None)  # each worker draws its own noise
        return [self._call(i, "generate", shard, interruptible=self.partial,
                           seed=None if seed is None else seed + 104729 * i, **sampling)
                for i, shard in enumerate(shards) if shard]

    def submit_resume(self, partials: list, **sampling) -> list[RolloutCall]:
        """Continue interrupted samples from their prefixes (a group's samples on one worker)."""
        n = len(self.workers)
        shards = [[p for p in partials if p.group_id % n == i] for i in range(n)]
        return [self._call(i, "resume", shard, interruptible=self.partial, **sampling)
                for i, shard in enumerate(shards) if shard]

    def _call(self, index: int, method: str, *args, **kwargs) -> RolloutCall:
        actor = self.workers[index]
        return RolloutCall(index, actor, method, args, kwargs, getattr(actor, method).remote(*args, **kwargs))

    def interrupt(self) -> None:
        """Stop the rollouts in flight at their next engine step (rollout.partial). A worker
        that is gone has nothing in flight; `wait` deals with its calls."""
        for ref in [w.interrupt.remote() for w in self.workers]:
            try:
                ray.get(ref, timeout=self.timeout_s)
            except (RayActorError, GetTimeoutError):
                pass

    def wait(self, handle: list[RolloutCall]) -> list[RolloutResult]:
        """The results of submitted calls, in order. A worker lost meanwhile (dead, or hung past
        trainer.actor_timeout_s: rl/supervision.py) is replaced through `on_lost`, and its share
        is re-issued to the replacement with the same arguments, seeds included, so every
        request comes back exactly once."""
        calls = list(handle)
        while True:
            # a call sent to a worker that has been replaced since (e.g. a rollout submitted
            # ahead) will never answer: re-issue it to the current one
            calls = [self._call(c.index, c.method, *c.args, **c.kwargs) if c.actor is not self.workers[c.index]
                     else c for c in calls]
            try:
                return supervised_get([Watched("rollout", c.index, c.actor, c.ref, c.method) for c in calls],
                                      self.timeout_s)
            except ActorLost as lost:
                if self.on_lost is None:
                    raise
                self.on_lost(lost.index, lost.cause)

    def generate(self, requests: list[SampleRequest], **sampling) -> list[RolloutResult]:
        return self.wait(self.submit(requests, **sampling))

    def logits_processor_metrics(self) -> dict[str, float]:
        """The workers' logits-processor metrics since the last call: min/max reduced, row
        counts summed, means averaged over workers."""
        calls = [Watched("rollout", i, w, w.logits_processor_metrics.remote(), "logits_processor_metrics")
                 for i, w in enumerate(self.workers)]
        per_worker = [m for m in supervised_get(calls, self.timeout_s) if m]
        reducers = {"_min": min, "_max": max, "_rows": sum}
        out = {}
        for key in {k for m in per_worker for k in m}:
            values = [m[key] for m in per_worker if key in m]
            reduce = next((f for end, f in reducers.items() if key.endswith(end)), None)
            out[key] = reduce(values) if reduce else sum(values) / len(values)
        return out

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)


@dataclasses.dataclass
class LearnerCall:
    """A call submitted to the learners: refs[i] is rank i's result."""

    method: str
    refs: list


class LearnerGroup:
    """Data-parallel learners; rank 0 exports weights and writes checkpoints."""

    def __init__(self, config: Config, model_path: str, init_weights_path: str | None = None):
        n = config.learner.workers
        self.options = opts = _actor_options(config)
        env = {"runtime_env": {"env_vars": ACTOR_ENV}}
        model = dataclasses.replace(config.model, path=model_path)
        self.workers = [LearnerActor.options(**opts, **placement_options(config, "learner", rank, opts), **env).remote(
            model, config.learner, config.objective, temperature=config.rollout.temperature,
            seed=config.trainer.seed, init_weights_path=init_weights_path, rank=rank, world_size=n)
            for rank in range(n)]
        self.rank0 = self.workers[0]
        self.timeout_s = config.trainer.actor_timeout_s
        # fsdp: reading the full weights gathers shards from every rank, so every rank runs
        # those calls (scoring, weight export) and rank 0's result is used.
        sharded = config.learner.strategy == "fsdp" and n > 1
        self.full_weight_readers = self.workers if sharded else [self.rank0]
        """The ranks that run every call reading the full weights, rank 0 first."""
        if n > 1:
            # Rank 0 hosts the group's store on its own node, wherever Ray placed it.
            address = get_started([self.rank0.endpoint.remote()], "learner rank 0")[0]
            get_started([w.join_data_parallel.remote(address) for w in self.workers], "the learners' group")

    def submit_update(self, shards: list[TrainBatch]) -> LearnerCall:
        """Start one optimizer step on every rank; returns at once (`wait` for its result)."""
        return LearnerCall("update", [w.update.remote(s) for w, s in zip(self.workers, shards)])

    def wait(self, handle: LearnerCall):
        """Rank 0's result of a submitted call (every rank's is the same, or only rank 0 reads);
        ActorLost when a rank dies or hangs (rl/supervision.py)."""
        return self._get(handle)[0]

    def _get(self, handle: LearnerCall) -> list:
        # handle.refs[i] was sent to workers[i] (submit_* and call_all keep the ranks' order)
        return supervised_get([Watched("learner", i, w, r, handle.method)
                               for i, (w, r) in enumerate(zip(self.workers, handle.refs))], self.timeout_s)

    def update(self, shards: list[TrainBatch]) -> tuple[dict, object]:
        """One optimizer step on every rank -> (metrics, the objective's batch statistics);
        both are the same on every rank (reduced among the learners), rank 0's are returned."""
        return self.wait(self.submit_update(shards))

    def call_all(self, method: str, *args):
        return self._get(LearnerCall(method, [getattr(w, method).remote(*args) for w in self.workers]))

    def submit_rank0(self, method: str, *args) -> LearnerCall:
        """Start `method` where rank 0's result needs it: every rank when the model is sharded."""
        return LearnerCall(method, [getattr(w, method).remote(*args) for w in self.full_weight_readers])

    def rank0_result(self, method: str, *args):
        """Rank 0's result of `method` (run on every rank when the model is sharded)."""
        return self.wait(self.submit_rank0(method, *args))

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
