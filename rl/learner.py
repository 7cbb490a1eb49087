"""Learner worker: the trained model, its optimizer, one update per training step.

Float32 master weights; forward/backward under bf16 autocast when `model.dtype` is 16-bit
(bf16 matmuls, fp32 accumulation and optimizer state). Micro-batch layouts (`layout`, see
rl/logprobs.py): shared_prompt (the default: a group's prompt runs once, its responses in
padded micro-batches against its KV cache), padded rectangles, or packed rows without padding.
Several learners form a data-parallel group (gloo on CPU, nccl on GPU): each takes a share of
the sequences, losses are normalized by the GLOBAL token/sequence counts, and gradients are
summed with all_reduce, so the update does not depend on how the batch was split.

A plain class, so tests run it without Ray; `rl.actors` wraps it as a Ray actor.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from rl.logprobs import (LAYOUTS, SharedPrompts, build_micro_batch, make_micro_batch,
                         make_response_micro_batch, response_logprobs, right_align)
from rl.packing import pack_micro_batches, pack_sequences, prompt_chunks

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _adamw(params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it: one kernel over all tensors instead of a Python
    loop per tensor (0.05 s vs 0.4 s per step for SmolLM2's 135M parameters on this CPU)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@dataclass
class TrainBatch:
    """One rank's share of a step's sequences (lists of equal length N)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    advantages: list[list[float]]
    """Per response token, [len(response_ids[i])] each."""
    rollout_logprobs: list[list[float]]
    num_tokens: float
    """Valid response tokens of the GLOBAL batch (all ranks)."""
    num_seqs: float
    """Sequences with >= 1 response token in the GLOBAL batch."""
    max_len: float
    """Dr. GRPO's constant C."""
    batch_stats: object = None
    """Objective's batch-level statistics over the global batch (HAPO), computed by the learner group."""


@dataclass
class LearnerSettings:
    model_path: str
    dtype: str = "bfloat16"
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=list)
    objective: str = "grpo"
    objective_params: dict = field(default_factory=dict)
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    micro_batch_tokens: int = 4096
    layout: str = "auto"
    """Micro-batch layout: padded (left-padded rectangle) | packed (one row, no padding) |
    shared_prompt (each distinct prompt runs once per update, its KV cache serves all its
    samples) | auto (shared_prompt, or padded under gradient checkpointing, which turns the
    cache off). Speeds on this CPU: docs/BENCHMARKS.md (shared_prompt fastest, packed slowest)."""
    attn_implementation: str = "auto"
    """transformers attention kernel: auto (eager on CPU, where it beat SDPA by ~15% on these
    short sequences, forward + backward; sdpa on GPU) | eager | sdpa | flash_attention_2."""
    packed_row_tokens: int = 256
    """Packed layout: most tokens in one row (capped by micro_batch_tokens). SDPA with the
    block-diagonal mask computes the full S x S scores, so attention per token grows with the
    row length: on CPU a 2048-token row cost ~7x the attention of the same tokens padded
    (docs/BENCHMARKS.md); short rows keep it near sum L_i^2."""
    temperature: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0
    init_weights_path: str | None = None
    """Full fine-tuning resume: load weights from this checkpoint instead of model_path."""
    strategy: str = "replicate"
    """Data parallelism: replicate | fsdp (rl/fsdp.py)."""

    def __post_init__(self):
        if self.strategy not in ("replicate", "fsdp"):
            raise ValueError(f"LearnerSettings.strategy = {self.strategy!r}: use replicate or fsdp")
        if self.strategy == "fsdp" and self.lora_rank > 0:
            raise ValueError("LearnerSettings.strategy = 'fsdp' does not support LoRA; use replicate")
        if self.layout == "auto":
            shared_ok = not self.gradient_checkpointing and self.strategy != "fsdp"
            self.layout = "shared_prompt" if shared_ok else "padded"
        if self.layout == "shared_prompt" and self.strategy == "fsdp":
            raise ValueError("LearnerSettings.layout = 'shared_prompt' does not run under fsdp; use padded or packed")
        if self.layout not in LAYOUTS:
            raise ValueError(f"LearnerSettings.layout = {self.layout!r}: use one of {', '.join(LAYOUTS)}")
        if self.layout == "shared_prompt" and self.gradient_checkpointing:
            # transformers turns the KV cache off under gradient checkpointing in training
            raise ValueError("LearnerSettings.layout = 'shared_prompt' needs the KV cache, which "
                             "gradient checkpointing disables; use layout 'padded' with it")


class Learner:
    def __init__(self, settings: LearnerSettings, rank: int = 0, world_size: int = 1,
                 dist_address: str | None = None, num_threads: int | None = None):
        from transformers import AutoModelForCausalLM

        from rl.objectives import get_objective

        torch.set_num_threads(num_threads or os.cpu_count() or 1)
        torch.manual_seed(settings.seed + rank)
        self.s = settings
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self._distributed = False
        self.fsdp = False  # True once the model is sharded (strategy fsdp, world_size > 1)
        self.autocast_dtype = _DTYPES[settings.dtype]
        weights_path = settings.init_weights_path or settings.model_path
        attn = settings.attn_implementation
        if attn == "auto":
            attn = "sdpa" if self.device.type == "cuda" else "eager"
        model = AutoModelForCausalLM.from_pretrained(weights_path, dtype=torch.float32,
                                                     attn_implementation=attn).to(self.device)
        self.tie_word_embeddings = bool(getattr(model.config, "tie_word_embeddings", False))
        self.objective = get_objective(settings.objective, **settings.objective_params)
        self.ref_model = None
        if settings.lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(
                r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                target_modules=list(settings.lora_target_modules), task_type="CAUSAL_LM"))
        elif self.objective.needs_ref:
            # The reference is the initial policy: the base model, even when resuming.
            self.ref_model = AutoModelForCausalLM.from_pretrained(
                settings.model_path, dtype=torch.float32, attn_implementation=attn,
            ).to(self.device).eval().requires_grad_(False)
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.model = model
        self._make_optimizer()
        self.pad_id = int(model.config.pad_token_id if model.config.pad_token_id is not None else 0)
        # No address: the owner calls join_data_parallel later (LearnerGroup does).
        if world_size > 1 and dist_address is not None:
            self.join_data_parallel(dist_address)

    def _make_optimizer(self) -> None:
        """AdamW + warm-up schedule over the trainable parameters (again after FSDP sharding,
        which replaces every parameter by its DTensor shard)."""
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.fsdp:  # fused kernels take plain tensors, not DTensor shards
            self.optimizer = torch.optim.AdamW(self.params, lr=self.s.lr, weight_decay=self.s.weight_decay)
        else:
            self.optimizer = _adamw(self.params, self.s.lr, self.s.weight_decay)
        warmup = max(1, self.s.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup))

    # --- distributed ------------------------------------------------------------------

    def _init_distributed(self, address: str) -> None:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}",
                                rank=self.rank, world_size=self.world_size)

    def endpoint(self) -> str:
        """"host:port" on this actor's node with a port free now: where a group whose rank 0 is
        this learner can meet (on a cluster, rank 0 may not share the driver's node)."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return f"{ray.util.get_node_ip_address()}:{s.getsockname()[1]}"

    def join_data_parallel(self, address: str) -> None:
        """Join the learners' group at `address` (rank 0's `endpoint()`); every rank at once.
        Under strategy fsdp the model is sharded across the group here."""
        if self.world_size > 1 and not self._distributed:
            self._init_distributed(address)
            self._distributed = True
            if self.s.strategy == "fsdp":
                from rl.fsdp import shard_model

                shard_model(self.model)
                self.fsdp = True
                self._make_optimizer()

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(tensor)
        return tensor

    # --- forward helpers --------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _ref_context(self):
        """Reference policy: a frozen copy, or the LoRA model with adapters disabled."""
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        return self.model, self.model.disable_adapter()

    def entropies(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Per-token entropies of the current policy (no gradient), for batch-level statistics."""
        out: list[list[float]] = [[] for _ in prompt_ids]
        with torch.no_grad():
            for idx, mb, _, _ in self._iter_micro_batches(prompt_ids, response_ids):
                with self._autocast():
                    _, ent = response_logprobs(self.model, mb, self.s.temperature, with_entropy=True)
                for row, i in enumerate(idx):
                    n = len(response_ids[i])
                    out[i] = ent[row, ent.shape[1] - n:].tolist() if n else []
        return out

    def _micro_batches(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[int]]:
        """Sequence indices per micro-batch under the token budget (padded and packed layouts)."""
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        if self.s.layout == "packed":
            return pack_sequences(lengths, min(self.s.micro_batch_tokens, self.s.packed_row_tokens))
        return pack_micro_batches(lengths, self.s.micro_batch_tokens)

    def _iter_micro_batches(self, prompts: list[list[int]], responses: list[list[int]], with_ref: bool = False):
        """Yield (indices, micro-batch, reference micro-batch or None, pass-1 token counts).

        shared_prompt: per chunk of whole prompt groups, pass 1 runs the chunk's distinct
        prompts once (under autocast; and once more on the reference policy when `with_ref`);
        its micro-batches follow, then ONE backward through pass 1 once the caller has run
        the chunk's last micro-batch backward (a no-op under no_grad). The pass-1 token counts
        (processed, real) come with the chunk's first micro-batch, (0, 0) otherwise.
        """
        if self.s.layout != "shared_prompt":
            for idx in self._micro_batches(prompts, responses):
                mb = self._build([prompts[i] for i in idx], [responses[i] for i in idx])
                yield idx, mb, (mb if with_ref else None), (0, 0)
            return
        for chunk in prompt_chunks(prompts, self.s.micro_batch_tokens):
            rows: dict[tuple[int, ...], int] = {}
            for i in chunk:
                rows.setdefault(tuple(prompts[i]), len(rows))
            distinct = [list(p) for p in rows]
            with self._autocast():
                shared = SharedPrompts(self.model, distinct, self.pad_id)
                ref_shared = None
                if with_ref:
                    ref_model, ctx = self._ref_context()
                    with torch.no_grad(), ctx:
                        ref_shared = SharedPrompts(ref_model, distinct, self.pad_id)
            counts = (shared.num_processed_tokens, shared.num_real_tokens)
            for group in pack_micro_batches([len(responses[i]) for i in chunk], self.s.micro_batch_tokens):
                idx = [chunk[j] for j in group]
                mb = self._to_device(make_response_micro_batch(
                    shared, [rows[tuple(prompts[i])] for i in idx], [responses[i] for i in idx], self.pad_id))
                yield idx, mb, (replace(mb, shared=ref_shared) if with_ref else None), counts
                counts = (0, 0)
            shared.backward()

    def _build(self, prompts: list[list[int]], responses: list[list[int]]):
        return self._to_device(build_micro_batch(self.s.layout, prompts, responses, self.pad_id))

    def _to_device(self, mb):
        if self.device.type == "cpu":
            return mb
        for name, value in list(vars(mb).items()):
            if isinstance(value, torch.Tensor):
                setattr(mb, name, value.to(self.device))
        return mb

    # --- the update -------------------------------------------------------------------

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on this rank's share; metrics are global (all ranks)."""
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        local = self.accumulate_gradients(batch)
        # Global reductions: gradients (sum; losses are already globally normalized) and metrics.
        if self.world_size > 1 and not self.fsdp:  # FSDP reduce-scatters in backward
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self._all_reduce(p.grad)
        sums = local["sums"]
        keys = sorted(sums)
        reduced = self._all_reduce(torch.tensor(
            [local["loss"], local["response_tokens"], local["tokens"], local["processed_tokens"],
             local["real_tokens"]] + [sums[k] for k in keys], dtype=torch.float64))
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, self.s.grad_clip if self.s.grad_clip > 0 else float("inf"))
        if self.fsdp:
            from rl.fsdp import full_tensor

            grad_norm = full_tensor(grad_norm)  # the norm over all shards
        self.optimizer.step()
        self.scheduler.step()
        global_tokens = max(float(reduced[1]), 1.0)
        out = {k: float(reduced[5 + j]) / global_tokens for j, k in enumerate(keys)}
        tokens, processed, real = float(reduced[2]), float(reduced[3]), float(reduced[4])
        out.update({
            "loss": float(reduced[0]),
            "grad_norm": float(grad_norm),
            "lr": self.scheduler.get_last_lr()[0],
            "train/micro_batches": float(local["micro_batches"]),
            "train/padding_fraction": (processed - real) / processed if processed else 0.0,
            "train/tokens": tokens,
            "train/processed_tokens": processed,
            "time/train_compute": time.perf_counter() - start,
        })
        return out

    def accumulate_gradients(self, batch: TrainBatch) -> dict:
        """Forward + backward over this rank's micro-batches, adding into `.grad` (no step).

        Returns this rank's sums: loss, token counts, and token-weighted metric sums.
        """
        from rl.objectives.common import LossNorm

        self.model.train()
        obj = self.objective
        norm = LossNorm(batch.num_tokens, batch.num_seqs, batch.max_len)
        lengths = [len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)]
        sums: dict[str, float] = {}
        total_loss = 0.0
        processed = real = micro_batches = 0
        with_entropy = True  # entropy is a logged metric for every objective
        if self.fsdp:  # agreed BEFORE the first forward: each forward/backward is a collective
            from rl.fsdp import pad_to_common_count

            common_count = pad_to_common_count(len(self._micro_batches(batch.prompt_ids, batch.response_ids)),
                                               self.device)
        for idx, mb, ref_mb, (pass1_processed, pass1_real) in self._iter_micro_batches(
                batch.prompt_ids, batch.response_ids, with_ref=obj.needs_ref):
            micro_batches += 1
            processed += mb.num_processed_tokens + pass1_processed
            real += mb.num_real_tokens + pass1_real
            T = mb.response_ids.shape[1]
            adv = right_align([batch.advantages[i] for i in idx], T).to(self.device)
            rollout_lp = right_align([batch.rollout_logprobs[i] for i in idx], T).to(self.device)
            with self._autocast():
                logp, entropy = response_logprobs(self.model, mb, self.s.temperature, with_entropy)
                ref_logp = None
                if obj.needs_ref:
                    ref_model, ctx = self._ref_context()
                    with torch.no_grad(), ctx:
                        ref_logp, _ = response_logprobs(ref_model, ref_mb, self.s.temperature)
            # One optimizer step per rollout batch: the policy that generated the batch IS the
            # current one, so old_logp equals logp detached (ratio 1) without a second forward.
            old_logp = logp.detach()
            loss, metrics = obj.loss(logp, old_logp, adv, mb.response_mask, ref_logp=ref_logp,
                                     entropy=entropy if obj.needs_entropy else None,
                                     norm=norm, batch_stats=batch.batch_stats)
            loss.backward()
            total_loss += float(loss.detach())
            n_tok = float(mb.num_response_tokens)
            metrics = dict(metrics)
            metrics["entropy"] = float(entropy[mb.response_mask].float().mean()) if n_tok else 0.0
            diff = (rollout_lp - old_logp)[mb.response_mask]
            metrics["train/rollout_logprob_abs_diff"] = float(diff.abs().mean()) if n_tok else 0.0
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n_tok
        self._micro_batches_run = micro_batches  # before padding (tests read it)
        if self.fsdp:
            from rl.fsdp import zero_gradient_pass

            for _ in range(common_count - micro_batches):  # pair up with the other ranks' collectives
                with self._autocast():
                    zero_gradient_pass(self.model, self.device, self.pad_id)
        return {"loss": total_loss, "sums": sums, "micro_batches": micro_batches,
                "response_tokens": float(sum(len(r) for r in batch.response_ids)),
                "tokens": float(sum(lengths)),
                "processed_tokens": float(processed), "real_tokens": float(real)}

    # --- scoring, weights, checkpoints ------------------------------------------------

    def score(self, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
        """Log-probs of `token_ids` after `prompt_ids` at temperature 1 (raw model), for sync checks."""
        self.model.eval()
        mb = self._to_device(make_micro_batch([prompt_ids], [token_ids], self.pad_id))
        with torch.no_grad(), self._autocast():
            logp, _ = response_logprobs(self.model, mb, 1.0)
        return logp[0, logp.shape[1] - len(token_ids):].tolist()

    def export_weights(self) -> dict[str, torch.Tensor]:
        """Current weights under Hugging Face names, in the rollout dtype (LoRA merged in)."""
        dtype = _DTYPES[self.s.dtype]
        if self.s.lora_rank > 0:
            return self._merged_lora_weights(dtype)
        return {k: v.to(dtype).contiguous() for k, v in self._full_weights().items()}

    def export_flat_weights(self):
        """`export_weights` as a `rollout.weights.FlatWeights`: one contiguous buffer per dtype.

        The fp32 -> rollout-dtype cast writes straight into a buffer reused across steps, and
        Ray moves the buffer through its shared-memory object store without pickling tensors
        (see rollout/weights.py). This is the CPU sync path.
        """
        from rollout.weights import FlatPacker

        dtype = _DTYPES[self.s.dtype]
        named = self._weights_to_send(dtype)
        if self.rank != 0:
            return None  # fsdp: this rank only took part in gathering the shards
        if getattr(self, "_packer", None) is None:
            self._packer = FlatPacker(dtype)
        return self._packer.pack(named)

    def _weights_to_send(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """HF-named weights the rollout engines load (fp32 masters, cast on the way; LoRA merged)."""
        return self._merged_lora_weights(dtype) if self.s.lora_rank > 0 else self._full_weights()

    # --- collective broadcast to the rollout engines (rollout/weight_broadcast.py) ---------

    def weight_broadcast_endpoint(self) -> dict:
        """Where the broadcast group meets: this node's address, a free port (rank 0 hosts the
        group's store there) and the backend (nccl when the weights are on a GPU, else gloo)."""
        host, port = self.endpoint().rsplit(":", 1)
        return {"master_address": host, "master_port": int(port),
                "backend": "nccl" if self.device.type == "cuda" else "gloo"}

    def join_weight_broadcast(self, master_address: str, master_port: int, backend: str,
                              world_size: int, bucket_bytes: int) -> None:
        """Open the broadcast group as its rank 0; blocks until the rollout engines have joined."""
        from rollout.weight_broadcast import WeightBroadcaster, open_group

        group = open_group(master_address, master_port, 0, world_size, backend)
        self._broadcaster = WeightBroadcaster(group, self.device, bucket_bytes)

    def weight_metas(self) -> list:
        """What `broadcast_weights` sends, in order (names, rollout dtype, shapes)."""
        from rollout.weight_broadcast import describe

        dtype = _DTYPES[self.s.dtype]
        # Shapes only: DTensor shards report the full shape, so nothing is gathered here.
        named = self._merged_lora_weights(dtype) if self.s.lora_rank > 0 else self._full_weights(gather=False)
        return describe(named, dtype)

    def broadcast_weights(self) -> dict[str, float]:
        """Send the weights to every rollout engine of the group (they run `receive_weight_broadcast`)."""
        dtype = _DTYPES[self.s.dtype]
        named = self._weights_to_send(dtype)
        if self.rank != 0:
            return {}  # fsdp: this rank only took part in gathering the shards
        return self._broadcaster.send(named, dtype)

    def _full_weights(self, gather: bool = True) -> dict[str, torch.Tensor]:
        """HF-named fp32 weights. fsdp: gathered from the shards (a collective: every rank
        calls it, in the same order), unless gather=False (DTensor shards, full shapes)."""
        state = self.model.state_dict()
        if self.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # same tensor as embed_tokens; saves bytes
        if self.fsdp and gather:
            from rl.fsdp import full_tensor

            return {k: full_tensor(v).detach() for k, v in state.items()}
        return {k: v.detach() for k, v in state.items()}

    def _merged_lora_weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        self.model.merge_adapter()
        try:
            base = self.model.get_base_model()
            out = {}
            for name, tensor in base.state_dict().items():
                if "lora_" in name:
                    continue
                name = name.replace(".base_layer.", ".")
                if self.tie_word_embeddings and name == "lm_head.weight":
                    continue
                out[name] = tensor.detach().to(dtype).clone()
            return out
        finally:
            self.model.unmerge_adapter()

    def save_checkpoint(self, path: str, tokenizer_source: str) -> None:
        """Hugging Face model (float32, LoRA merged) + tokenizer + optimizer state in `path`.
        Every rank calls it (fsdp gathers the shards); rank 0 writes."""
        from transformers import AutoTokenizer

        if self.fsdp:
            from rl.fsdp import full_state_dicts

            model_state, optim_state = full_state_dicts(self.model, self.optimizer)
        if self.rank != 0:
            return
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if self.fsdp:
            self.model.save_pretrained(out, state_dict=model_state, safe_serialization=True)
            AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(out)
            # Keyed by parameter name (not index): loads into any number of fsdp ranks.
            torch.save({"optimizer_by_name": optim_state, "scheduler": self.scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state()}, out / "optimizer.pt")
            return
        if self.s.lora_rank > 0:
            self.model.save_pretrained(out / "adapter")
            base = copy.deepcopy(self.model).merge_and_unload()
            base.save_pretrained(out, safe_serialization=True)
        else:
            self.model.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(out)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state()}, out / "optimizer.pt")

    def load_training_state(self, path: str) -> None:
        """Optimizer, LR schedule, RNG (and LoRA adapter) from a checkpoint of `save_checkpoint`."""
        out = Path(path)
        if self.s.lora_rank > 0:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.model, load_file(str(out / "adapter" / "adapter_model.safetensors")))
        state = torch.load(out / "optimizer.pt", weights_only=False)
        if self.fsdp != ("optimizer_by_name" in state):
            saved, now = ("fsdp", "replicate") if "optimizer_by_name" in state else ("replicate", "fsdp")
            raise ValueError(f"{out / 'optimizer.pt'} holds the optimizer state of a learner.strategy = {saved} "
                             f"run; this run uses {now} (with {self.world_size} learner(s)). Resume with "
                             f"learner.strategy: {saved}.")
        if self.fsdp:
            from rl.fsdp import load_full_optimizer_state

            load_full_optimizer_state(self.model, self.optimizer, state["optimizer_by_name"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])

    def parameter_checksum(self) -> float:
        """Sum of |weights| of the trainable parameters (cheap change detector for tests)."""
        return float(sum(p.detach().abs().sum() for p in self.params))
