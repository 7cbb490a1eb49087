"""The plan itself (`plan_config`): the actor layout on the GPUs and each actor's memory
(weights, gradients, optimizer state, activations, KV cache) against the device, with the
warnings when it will not fit."""

from __future__ import annotations

import math

from rl.errors import ConfigError
from rl.plan.activations import learner_activation_items, resolved_layout
from rl.plan.architectures import find_architecture
from rl.plan.devices import GIB, MIB, _gib, gpu_memory
from rl.plan.results import ActorPlan, Item, Plan

HEADROOM = 0.10
"""Below this fraction of the device left free the plan says "tight": the learner estimate
was within -6%..+3% of measured CPU peaks and 5-27% over measured GPU peaks (docs/CLUSTER.md),
and allocators fragment."""
CUDA_CONTEXT_BYTES = 512 * MIB
"""Per GPU process outside PyTorch's tensors: CUDA context, cuBLAS workspace, NCCL buffers."""
ROLLOUT_RUNTIME_BYTES = 1 * GIB
"""vLLM's own working memory inside gpu_memory_utilization besides weights and KV cache:
activations of its profiling pass, sampler buffers (rough allowance)."""
CUDA_GRAPH_BYTES = 512 * MIB
"""Extra for CUDA graphs when rollout.enforce_eager is false (rough allowance)."""


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def plan_config(config, gpu: str = "H100-80GB", gpus: int | None = None, config_path: str = "") -> Plan:
    """The layout and memory plan of `config` (rl.config.Config) on `gpus` x `gpu`."""
    arch = find_architecture(config.model.path)
    device, device_bytes = gpu_memory(gpu)
    on_cpu = device == "cpu"
    R_w, L_w = config.rollout.workers, config.learner.workers
    needed = R_w + L_w
    if on_cpu:
        n_gpus = 0
        share = 0.0
        layout = (f"CPU: {R_w} rollout + {L_w} learner actors share this machine's cores and "
                  f"{device_bytes / GIB:.1f} GiB of RAM (rl/actors.py: actors reserve no CPUs)")
    else:
        n_gpus = needed if gpus is None else gpus
        if n_gpus <= 0:
            raise ConfigError(f"--gpus {gpus} must be a positive number of GPUs.")
        share = 1.0 if n_gpus >= needed else n_gpus / needed
        if share == 1.0:
            layout = (f"{n_gpus} GPU(s) for {R_w} rollout + {L_w} learner actors: each actor gets a GPU of its own"
                      + (f" ({n_gpus - needed} left idle)" if n_gpus > needed else ""))
        else:
            layout = (f"{n_gpus} GPU(s) for {needed} actors ({R_w} rollout + {L_w} learner): each actor gets "
                      f"{share:.3g} GPU (rl/actors.py: equal fractions when there are fewer GPUs than actors; "
                      "rollout and learner colocated)")
    warnings: list[str] = []
    P = arch.params
    model_bytes = _dtype_bytes(config.model.dtype)
    kv_per_token = arch.kv_bytes_per_token(model_bytes)

    # Rollout actor: vLLM takes gpu_memory_utilization of the whole device up front.
    r = config.rollout
    rollout = ActorPlan("rollout", R_w, share)
    reserved = int(r.gpu_memory_utilization * device_bytes)
    weights = P * model_bytes
    runtime = ROLLOUT_RUNTIME_BYTES + (0 if (r.enforce_eager or on_cpu) else CUDA_GRAPH_BYTES)
    kv_cap = max(0, reserved - weights - runtime)
    kv_tokens = kv_cap // kv_per_token
    rollout.items = [
        Item(f"weights ({config.model.dtype})", weights, f"{model_bytes} B x {P:,} params"),
        Item("vLLM runtime allowance", runtime, "profiling activations, sampler" + ("" if r.enforce_eager or on_cpu
                                                                                    else ", CUDA graphs")),
        Item("KV cache (what is left of gpu_memory_utilization)", kv_cap,
             f"{r.gpu_memory_utilization} x {device_bytes / GIB:.1f} GiB - weights - runtime = {kv_tokens:,} tokens "
             f"at {kv_per_token:,} B/token (2 x {arch.layers} layers x {arch.kv_heads} KV heads x {arch.head_dim} "
             f"x {model_bytes} B)"),
    ]
    budget = r.scheduler.budget_per_worker  # kv_budget_tokens with auto resolved; it sizes the cache
    if budget is not None:
        rollout.items[-1] = Item("KV cache (rollout.scheduler.kv_budget_tokens)", budget * kv_per_token,
                                 f"{budget:,} tokens at {kv_per_token:,} B/token, allocated as vLLM blocks "
                                 f"(num_gpu_blocks_override); gpu_memory_utilization would leave {kv_tokens:,}")
    seq = config.data.max_prompt_tokens + r.max_new_tokens
    per_worker_seqs = math.ceil(config.data.prompts_per_step / R_w) * r.group_size
    rollout.notes.append(f"one group (G = {r.group_size}) at full length ({seq} tokens each) needs "
                         f"{_gib(r.group_size * seq * kv_per_token)} of KV; all {per_worker_seqs} samples of a "
                         f"worker's share at once {_gib(per_worker_seqs * seq * kv_per_token)} (the scheduler "
                         f"admits what fits the budget)")
    if budget is not None:
        rollout.notes.append(f"rollout.scheduler.kv_budget_tokens = {budget:,}: {_gib(budget * kv_per_token)} of KV")
        if budget > kv_tokens:
            warnings.append(f"rollout.scheduler.kv_budget_tokens = {budget:,} tokens needs "
                            f"{_gib(budget * kv_per_token)} of KV cache, but gpu_memory_utilization = "
                            f"{r.gpu_memory_utilization} of {_gib(device_bytes)} leaves {_gib(kv_cap)} "
                            f"({kv_tokens:,} tokens) after the weights: lower the budget or raise "
                            "rollout.gpu_memory_utilization.")
    if kv_tokens < seq:
        warnings.append(f"the rollout engine's KV cache holds {kv_tokens:,} tokens ({_gib(kv_cap)} = "
                        f"{r.gpu_memory_utilization} x {_gib(device_bytes)} - weights {_gib(weights)} - runtime "
                        f"{_gib(runtime)}), less than one sequence of {seq} tokens: raise "
                        "rollout.gpu_memory_utilization.")
    if not on_cpu:
        rollout.notes.append(f"vLLM reserves gpu_memory_utilization x GPU = {_gib(reserved)} up front")

    # Learner actor.
    lc, lora = config.learner, config.model.lora
    learner = ActorPlan("learner", L_w, share)
    fsdp = lc.strategy == "fsdp" and L_w > 1
    shard = L_w if fsdp else 1
    trainable = arch.lora_params(lora.rank, list(lora.target_modules)) if lora.rank > 0 else P
    act_bytes = 4 if config.model.dtype == "float32" else 2
    attention = lc.attn_implementation
    if attention == "auto":
        attention = "eager" if on_cpu else "sdpa"
    needs_ref = config.objective.build().needs_ref
    sharded = " / %d ranks (fsdp)" % shard if fsdp else ""
    learner.items.append(Item("weights (fp32 masters)", 4 * P // shard, f"4 B x {P:,} params{sharded}"))
    if lora.rank > 0:
        learner.items.append(Item(f"LoRA adapters (rank {lora.rank}, fp32)", 4 * trainable,
                                  f"4 B x {trainable:,} params"))
    if act_bytes == 2:
        learner.items.append(Item("16-bit copies of the weights (autocast cache, kept for backward)",
                                  2 * arch.matmul_params() // shard, f"2 B x {arch.matmul_params():,} matmul params"))
    learner.items.append(Item("gradients (fp32)", 4 * trainable // shard,
                              f"4 B x {trainable:,} trainable params{sharded}"))
    learner.items.append(Item("AdamW state (fp32 exp_avg + exp_avg_sq)", 8 * trainable // shard,
                              f"8 B x {trainable:,} trainable params{sharded}"))
    if needs_ref and lora.rank == 0:
        learner.items.append(Item("reference model (fp32, KL term)", 4 * P, f"4 B x {P:,} params"))
    if fsdp:
        learner.items.append(Item("fsdp: two layers gathered in full", 2 * 4 * arch.layer_params(),
                                  "2 x 4 B x params of one layer"))
    act_items, act_notes = learner_activation_items(arch, config, act_bytes, attention, "cpu" if on_cpu else "cuda")
    learner.items += act_items
    learner.notes += act_notes
    learner.notes.append(f"layout {resolved_layout(lc, 'cpu' if on_cpu else 'cuda')}, attention {attention}, gradient checkpointing "
                         f"{'on' if lc.gradient_checkpointing else 'off'}, autocast "
                         f"{config.model.dtype if act_bytes == 2 else 'off (float32)'}")
    if not on_cpu:
        learner.items.append(Item("CUDA context, cuBLAS/NCCL buffers", CUDA_CONTEXT_BYTES, "per GPU process"))

    # The heaviest mix of actors on one device.
    if on_cpu:
        per_device = [(f"rollout x{R_w}", R_w * rollout.total), (f"learner x{L_w}", L_w * learner.total)]
    elif share == 1.0:
        heavier = max((rollout, learner), key=lambda a: a.total)
        per_device = [(heavier.role, heavier.total)]
        for actor in (rollout, learner):
            if actor.total > device_bytes:
                warnings.append(f"a {actor.role} actor needs {_gib(actor.total)} but its GPU ({device}) has "
                                f"{_gib(device_bytes)}: {_fix(actor.role, config)}")
    else:
        per_gpu = math.floor(1 / share + 1e-9)
        if per_gpu * n_gpus < needed:
            warnings.append(f"each actor asks Ray for {share:.3g} GPU, so one GPU fits {per_gpu} actor(s) and "
                            f"{n_gpus} GPU(s) fit {per_gpu * n_gpus} of the {needed} actors: Ray would wait "
                            "forever for the rest. Use as many GPUs as actors, or a number of GPUs that divides "
                            "the number of actors.")
        mix = sorted([rollout.total] * R_w + [learner.total] * L_w, reverse=True)[:per_gpu]
        n_roll = min(R_w, per_gpu)
        n_learn = max(0, min(L_w, per_gpu - n_roll))
        # The worst mix: as many rollout engines as fit (each takes utilization x the whole GPU)
        # plus learners; or the heaviest actors, whichever is larger.
        worst = n_roll * rollout.total + n_learn * learner.total
        if sum(mix) > worst:
            per_device = [("heaviest actors", sum(mix))]
        else:
            per_device = [(f"rollout x{n_roll}", n_roll * rollout.total)] if n_roll else []
            if n_learn:
                per_device.append((f"learner x{n_learn}", n_learn * learner.total))
        if n_roll * r.gpu_memory_utilization > 1:
            warnings.append(f"{n_roll} rollout engines on one GPU each take rollout.gpu_memory_utilization = "
                            f"{r.gpu_memory_utilization} of it: more than the whole GPU.")
    total = sum(b for _, b in per_device)
    if total > device_bytes and not (share == 1.0 and not on_cpu):
        what = " + ".join(f"{name} {_gib(b)}" for name, b in per_device)
        where = "this machine's RAM" if on_cpu else f"one {device}"
        warnings.append(f"{what} = {_gib(total)} on {where}, which has {_gib(device_bytes)}: "
                        f"{_fix('learner' if learner.total >= rollout.total else 'rollout', config)}")
    if total <= device_bytes and device_bytes - total < HEADROOM * device_bytes:
        warnings.append(f"{_gib(total)} of {_gib(device_bytes)} leaves {_gib(device_bytes - total)} free, less than "
                        f"{HEADROOM:.0%}: the learner estimate is good to about 10% (docs/CLUSTER.md), and "
                        "allocators fragment; leave more room.")
    return Plan(config_path, arch, device, device_bytes, n_gpus, rollout, learner, per_device, warnings, layout,
                kv_per_token, kv_tokens)


def _fix(role: str, config) -> str:
    if role == "rollout":
        return "lower rollout.gpu_memory_utilization or use a bigger GPU."
    hints = []
    if not config.learner.gradient_checkpointing:
        hints.append("learner.gradient_checkpointing: true")
    hints.append(f"a smaller learner.micro_batch_tokens (now {config.learner.micro_batch_tokens})")
    if config.model.lora.rank == 0:
        hints.append("LoRA (model.lora.rank)")
    if config.learner.strategy != "fsdp" and config.model.lora.rank == 0:
        hints.append("learner.strategy: fsdp with more learner workers")
    hints.append("or more GPUs")
    return "try " + ", ".join(hints) + "."
