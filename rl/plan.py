"""Plan a run before paying for GPUs: `python -m rl.plan CONFIG.yaml [--gpu H100-80GB] [--gpus N]`.

Validates the config (rl.config.load_config, the same checks as `python -m rl.train`) and
prints, without starting Ray, touching a GPU or contacting a model hub:

- the actor layout: rollout and learner workers and the GPU share of each, by the rule of
  rl/actors.py (`_actor_options`: one GPU each when there are enough, else equal fractions);
- per actor a memory plan: weights, gradients, optimizer state, activations of one
  micro-batch, the rollout engine's KV cache; the totals against the GPU's memory, with a
  warning (and the numbers) when a config will not fit.

The architecture comes from the model directory's config.json when it is local (or in the
Hugging Face cache), else from BUILTIN_MODELS. Every number is an estimate whose formula is
printed next to it; the learner's was compared with measured learners (tests/test_plan.py,
docs/CLUSTER.md).

    python -m rl.plan configs/gpu/qwen3_1.7b_1gpu.yaml --gpus 1
    python -m rl.plan configs/quickstart.yaml --gpu cpu
    python -m rl.plan configs/gpu/qwen3_1.7b_multi.yaml --gpu H200-141GB --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rl.errors import ConfigError, UserError

GIB = 1024**3
MIB = 1024**2


# --- architectures --------------------------------------------------------------------

@dataclass(frozen=True)
class Architecture:
    """What the memory plan needs of a decoder-only transformer (Llama / Qwen / SmolLM2 shape:
    RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    qk_norm: bool = False
    """Qwen3: an RMSNorm over head_dim on queries and keys."""
    qkv_bias: bool = False
    """Qwen2: biases on the q, k and v projections."""
    source: str = "built-in table"
    exact_params: int | None = None
    """Parameter count read from the checkpoint's safetensors headers, when local."""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.module_shapes().values())

    def layer_params(self) -> int:
        """Linear weights + q/k/v biases + two RMSNorms (+ Qwen3's q/k norms)."""
        n = self.layer_linear_params() + 2 * self.hidden
        if self.qkv_bias:
            n += self.q_dim + 2 * self.kv_dim
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    def formula_params(self) -> int:
        """embeddings + layers + final norm (+ lm_head when not tied)."""
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied_embeddings else 2) + self.layers * self.layer_params() + self.hidden

    @property
    def params(self) -> int:
        return self.exact_params if self.exact_params is not None else self.formula_params()

    def matmul_params(self) -> int:
        """Weights that go through a matmul (cast to 16 bits under autocast): every linear
        layer and the head."""
        return self.layers * self.layer_linear_params() + self.vocab * self.hidden

    def lora_params(self, rank: int, targets: list[str]) -> int:
        shapes = self.module_shapes()
        return self.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """2 (K and V) x layers x kv_heads x head_dim x bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def describe(self) -> str:
        tie = "tied" if self.tied_embeddings else "untied"
        extra = (", q/k norm" if self.qk_norm else "") + (", qkv bias" if self.qkv_bias else "")
        return (f"{self.layers} layers, hidden {self.hidden}, {self.heads} heads / {self.kv_heads} KV heads "
                f"x {self.head_dim}, intermediate {self.intermediate}, vocab {self.vocab}, {tie} embeddings{extra}")


def _arch(name, layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, tied, qk_norm=False):
    return Architecture(name, layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, tied, qk_norm)


BUILTIN_MODELS: dict[str, Architecture] = {a.name: a for a in (
    # Qwen3 (config.json of each model): head_dim 128 whatever the hidden size; q/k norms.
    _arch("Qwen/Qwen3-0.6B", 28, 1024, 16, 8, 128, 3072, 151936, True, qk_norm=True),
    _arch("Qwen/Qwen3-1.7B", 28, 2048, 16, 8, 128, 6144, 151936, True, qk_norm=True),
    _arch("Qwen/Qwen3-4B", 36, 2560, 32, 8, 128, 9728, 151936, True, qk_norm=True),
    _arch("Qwen/Qwen3-8B", 36, 4096, 32, 8, 128, 12288, 151936, False, qk_norm=True),
    _arch("meta-llama/Llama-3.2-1B", 16, 2048, 32, 8, 64, 8192, 128256, True),
    _arch("meta-llama/Llama-3.2-3B", 28, 3072, 24, 8, 128, 8192, 128256, True),
    _arch("meta-llama/Llama-3.1-8B", 32, 4096, 32, 8, 128, 14336, 128256, False),
    _arch("HuggingFaceTB/SmolLM2-135M", 30, 576, 9, 3, 64, 1536, 49152, True),
    _arch("HuggingFaceTB/SmolLM2-360M", 32, 960, 15, 5, 64, 2560, 49152, True),
    _arch("HuggingFaceTB/SmolLM2-1.7B", 24, 2048, 32, 32, 64, 8192, 49152, True),
)}
"""Architectures of common models (the numbers of their Hugging Face config.json), looked up
by name without the organisation and without an -Instruct / -Base suffix."""


def _table_key(name: str) -> str:
    base = name.rsplit("/", 1)[-1].lower()
    for suffix in ("-instruct", "-base"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


def builtin_architecture(name: str) -> Architecture | None:
    key = _table_key(name.removeprefix("demo:"))
    for arch in BUILTIN_MODELS.values():
        if _table_key(arch.name) == key:
            return arch
    return None


def architecture_from_config(cfg: dict, name: str, source: str) -> Architecture:
    """An Architecture from a Hugging Face config.json (dict)."""
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        model_type = str(cfg.get("model_type", ""))
        return Architecture(
            name=name, layers=int(cfg["num_hidden_layers"]), hidden=hidden, heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=model_type.startswith("qwen3"),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            source=source)
    except KeyError as e:
        raise ConfigError(f"model.path = {name!r}: its config.json ({source}) has no {e.args[0]!r}; rl.plan "
                          "knows decoder-only Llama/Qwen-shaped models only.") from None


def safetensors_params(model_dir: Path) -> int | None:
    """Parameters stored in a directory's *.safetensors files, read from their headers only."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, meta in header.items():
            if key != "__metadata__":
                total += math.prod(meta["shape"])
    return total


def find_architecture(model_path: str) -> Architecture:
    """The architecture of `model.path`, without a network: a local directory's config.json,
    the converted demo model, the Hugging Face cache, then BUILTIN_MODELS."""
    candidates: list[tuple[Path, str]] = []
    if model_path.startswith("demo:"):
        from rl.demo_model import DEMO_MODEL_NAME, default_cache_dir

        candidates.append((default_cache_dir() / DEMO_MODEL_NAME, "the converted demo model"))
    else:
        local = Path(os.path.expanduser(model_path))
        if local.is_dir():
            if not (local / "config.json").exists():
                raise ConfigError(f"model.path = {model_path!r} is a directory without config.json: point it "
                                  "at a Hugging Face model directory.")
            candidates.append((local, str(local / "config.json")))
        elif model_path.count("/") == 1 and not model_path.startswith((".", "/", "~")):
            try:
                from huggingface_hub import try_to_load_from_cache  # reads the cache only

                cached = try_to_load_from_cache(model_path, "config.json")
                if isinstance(cached, str):
                    candidates.append((Path(cached).parent, f"Hugging Face cache ({cached})"))
            except Exception:
                pass
    for directory, source in candidates:
        if (directory / "config.json").exists():
            arch = architecture_from_config(json.loads((directory / "config.json").read_text()), model_path, source)
            return dataclasses.replace(arch, exact_params=safetensors_params(directory))
    arch = builtin_architecture(model_path)
    if arch is not None:
        return dataclasses.replace(arch, source=f"built-in table ({arch.name})")
    names = ", ".join(BUILTIN_MODELS)
    raise ConfigError(f"model.path = {model_path!r}: rl.plan does not know its architecture (not a local "
                      f"directory, not in the Hugging Face cache, not in the built-in table). Point model.path "
                      f"at a local model directory with config.json, or use one of: {names}, "
                      "demo:SmolLM2-135M-Instruct.")


# --- GPUs -----------------------------------------------------------------------------

GPUS: dict[str, int] = {
    # Total memory as nvidia-smi reports it (MiB); a few hundred MiB of it are the driver's.
    "H100-80GB": 81559 * MIB,
    "H200-141GB": 143771 * MIB,
    "A100-40GB": 40960 * MIB,
    "A100-80GB": 81920 * MIB,
    "L40S-48GB": 46068 * MIB,
}
"""GPU name -> bytes of memory. `cpu` (this machine's RAM) is accepted too."""


def gpu_memory(name: str) -> tuple[str, int]:
    """(canonical name, bytes) of a GPU name (case-insensitive, a unique prefix is enough)."""
    if name.lower() == "cpu":
        import psutil

        return "cpu", int(psutil.virtual_memory().total)
    matches = [g for g in GPUS if g.lower() == name.lower()] or [g for g in GPUS if g.lower().startswith(name.lower())]
    if len(matches) != 1:
        raise ConfigError(f"--gpu {name!r} is {'ambiguous' if matches else 'unknown'}: use one of "
                          f"{', '.join(GPUS)}, cpu.")
    return matches[0], GPUS[matches[0]]


# --- the plan -------------------------------------------------------------------------

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


@dataclass
class Item:
    label: str
    bytes: int
    formula: str = ""


@dataclass
class ActorPlan:
    role: str
    """rollout | learner"""
    count: int
    gpu_share: float
    """GPUs per actor (0 on CPU)."""
    items: list[Item] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(i.bytes for i in self.items)


@dataclass
class Plan:
    config_path: str
    model: Architecture
    device: str
    device_bytes: int
    gpus: int
    rollout: ActorPlan
    learner: ActorPlan
    per_device: list[tuple[str, int]]
    """The heaviest mix of actors on one device: (what, bytes)."""
    warnings: list[str]
    layout: str
    kv_bytes_per_token: int
    kv_capacity_tokens: int

    @property
    def device_total(self) -> int:
        return sum(b for _, b in self.per_device)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"]["params"] = self.model.params
        d["device_total"] = self.device_total
        d["rollout"]["total"], d["learner"]["total"] = self.rollout.total, self.learner.total
        return d


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def activation_bytes_per_token_layer(arch: Architecture, act_bytes: int, attention: str, seq_len: int) -> tuple[int, str]:
    """Bytes one token keeps for backward in one decoder layer (HF Llama/Qwen layer, fp32
    residual stream as the fp32 master weights give it, matmuls under autocast).

    Counted: the two RMSNorms keep their fp32 input and normalized output (16 h); under
    16-bit autocast each of q, k, v, gate, up keeps its own cast of the normed input
    (5 a h; in float32 the two norm outputs, 8 h); attention keeps the rotated queries, keys
    and values repeated to the query heads, and the o_proj input (4 a q; sdpa 5 a q + 4 heads
    for its output and log-sum-exp; flash_attention_2 a (3 q + 2 kv) + 4 heads); eager
    attention adds the softmax probabilities, fp32 and their cast ((4 + a) heads S per
    token, S = sequence length); Qwen3's q/k norms (8 + a)(q + kv); the SwiGLU MLP gate, up,
    silu(gate) and their product (4 a i). a = 2 under 16-bit autocast, 4 in float32.
    """
    h, q, kv, i, H = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate, arch.heads
    a = act_bytes
    half = a == 2
    norms = 16 * h
    casts = 5 * a * h if half else 8 * h
    if attention == "eager":
        attn = 4 * a * q + (4 + (a if half else 0)) * H * seq_len
        attn_f = f"4*{a}*q + {4 + (a if half else 0)}*heads*S"
    elif attention == "flash_attention_2":
        attn = a * (3 * q + 2 * kv) + 4 * H
        attn_f = f"{a}*(3q + 2kv) + 4*heads"
    else:
        attn = 5 * a * q + 4 * H
        attn_f = f"5*{a}*q + 4*heads"
    qk = (8 + (a if half else 0)) * (q + kv) if arch.qk_norm else 0
    mlp = 4 * a * i
    formula = (f"16h + {'5*%d*h' % a if half else '8h'} + [{attn_f}]"
               + (f" + {8 + (a if half else 0)}(q + kv)" if qk else "") + f" + 4*{a}*i")
    return norms + casts + attn + qk + mlp, formula


def learner_activation_items(arch: Architecture, c, act_bytes: int, attention: str,
                             device: str = "cuda") -> tuple[list[Item], list[str]]:
    """Activations of the largest micro-batch a learner rank runs (see activation_bytes_per_token_layer)."""
    P, R = c.data.max_prompt_tokens, c.rollout.max_new_tokens
    L = arch.layers
    seq = P + R
    notes = []
    # a rank's share of one mini-batch (each optimizer step's micro-batches are cut from it)
    prompts_per_rank = math.ceil(c.data.prompts_per_step / (c.learner.workers * getattr(c.learner, "mini_batches", 1)))
    rank_tokens = prompts_per_rank * c.rollout.group_size * seq
    budget = c.learner.micro_batch_tokens
    layout = resolved_layout(c.learner, device)
    gc = c.learner.gradient_checkpointing
    if layout == "shared_prompt":
        per_step = math.ceil(prompts_per_rank * c.rollout.group_size * R / max(budget, R))
    else:
        per_step = math.ceil(rank_tokens / max(budget, seq))
    if per_step == 1:
        notes.append("one micro-batch per optimizer step: the gradients are allocated during its backward, after the "
                     "activations peak, so the peak may be lower by up to the gradients' size")
    if seq > budget:
        notes.append(f"a sequence of {seq} tokens (max_prompt_tokens + max_new_tokens) is longer than "
                     f"learner.micro_batch_tokens = {budget}: it gets a micro-batch of its own")
    # (tokens of the pass, sequence length its attention sees, label)
    if layout == "shared_prompt":
        passes = [(min(max(budget, R), prompts_per_rank * c.rollout.group_size * R), seq, "response micro-batch"),
                  (min(max(budget, P), prompts_per_rank * P), P, "prompt pass of its chunk")]
    else:
        passes = [(min(max(budget, seq), rank_tokens), seq, "micro-batch")]
    items = []
    for tokens, s, label in passes:
        per, formula = activation_bytes_per_token_layer(arch, act_bytes, attention, s)
        if gc:
            kept = tokens * L * 4 * arch.hidden
            items.append(Item(f"activations, {label}: layer inputs (gradient checkpointing)", kept,
                              f"T x layers x 4h = {tokens} x {L} x {4 * arch.hidden} B"))
            items.append(Item(f"activations, {label}: one layer recomputed in backward", tokens * per,
                              f"T x ({formula}) = {tokens} x {per} B"))
        else:
            items.append(Item(f"activations, {label} ({L} layers)", tokens * L * per,
                              f"T x layers x ({formula}) = {tokens} x {L} x {per} B"))
    # The head: the final norm, then the chunked lm_head + log-softmax on response tokens
    # (rl/logprobs.py): d hidden [K, H] fp32 formed in the forward, and under 16-bit autocast
    # softmax - onehot [K, V] kept in 16 bits for the head weight's gradient.
    T = passes[0][0]
    K = min(T, math.ceil(T * R / seq)) if layout != "shared_prompt" else T
    head = K * 4 * arch.hidden + T * 8 * arch.hidden
    head_f = f"8h x T + 4h x K"
    if act_bytes == 2:
        head += K * 2 * arch.vocab
        head_f += " + 2 V x K"
    items.append(Item("activations: final norm and chunked head", head,
                      f"{head_f}, K = {K} response tokens, T = {T}"))
    chunk = _head_chunk_elements(device)
    items.append(Item("head chunk buffers (transient)", 10 * chunk,
                      f"10 B x {chunk:,} elements: a 16-bit logits chunk and two float32 working copies"))
    return items, notes


def resolved_layout(learner, device: str) -> str:
    """`learner.layout` with auto decided for the planned device, as LearnerConfig.resolved_layout
    decides it on the machine that runs the learner: padded on a GPU, under gradient
    checkpointing and under fsdp; shared_prompt otherwise (CPU)."""
    if learner.layout != "auto":
        return learner.layout
    if learner.gradient_checkpointing or learner.strategy == "fsdp" or device != "cpu":
        return "padded"
    return "shared_prompt"


def _head_chunk_elements(device: str) -> int:
    """rl.logprobs.CHUNK_ELEMENTS for `device` (elements of one head chunk)."""
    from rl import logprobs

    budget = logprobs.CHUNK_ELEMENTS
    if isinstance(budget, dict):
        return int(budget.get(device, budget.get("default", 1 << 22)))
    return int(budget)


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
    budget = r.scheduler.kv_budget_tokens
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


def _gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"


def format_plan(plan: Plan) -> str:
    m = plan.model
    lines = [f"plan: {plan.config_path or '(config)'} on "
             + (f"this machine's RAM ({_gib(plan.device_bytes)})" if plan.device == "cpu"
                else f"{plan.gpus} x {plan.device} ({_gib(plan.device_bytes)} each)"),
             f"model: {m.name}: {m.params / 1e9:.3f} B parameters "
             f"({'counted in its safetensors' if m.exact_params is not None else 'from the architecture'}); "
             f"{m.describe()} [{m.source}]",
             f"layout: {plan.layout}", ""]
    for actor in (plan.rollout, plan.learner):
        share = f", {actor.gpu_share:.3g} GPU each" if plan.device != "cpu" else ""
        lines.append(f"{actor.role} actor x{actor.count}{share}: {_gib(actor.total)} each")
        width = max(len(i.label) for i in actor.items)
        for i in actor.items:
            lines.append(f"  {i.label:<{width}}  {_gib(i.bytes):>11}   {i.formula}")
        for note in actor.notes:
            lines.append(f"  note: {note}")
        lines.append("")
    what = " + ".join(f"{name} {_gib(b)}" for name, b in plan.per_device)
    where = "this machine" if plan.device == "cpu" else "the fullest GPU"
    free = plan.device_bytes - plan.device_total
    verdict = ("DOES NOT FIT" if free < 0 else "fits, but tight" if free < HEADROOM * plan.device_bytes else "fits")
    lines.append(f"{where}: {what} = {_gib(plan.device_total)} of {_gib(plan.device_bytes)}: {verdict}"
                 + (f" ({_gib(free)} free)" if free >= 0 else f" ({_gib(-free)} over)"))
    for w in plan.warnings:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config, as for python -m rl.train")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--gpu", default="H100-80GB", help=f"one of {', '.join(GPUS)}, cpu (default H100-80GB)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs in the cluster (default: one per rollout and learner worker)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_intermixed_args(argv)
    from rl.config import load_config

    try:
        config = load_config(args.config, args.overrides)
        plan = plan_config(config, args.gpu, args.gpus, config_path=args.config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
