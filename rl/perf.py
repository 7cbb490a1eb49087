"""Model FLOPs, hardware peaks and MFU for the learner and the rollout.

Imports only torch and the standard library (no ray, vllm or omegaconf), so standalone
scripts (scripts/gpu_learner_check.py) can use it.

FLOP convention (`flops_per_token`): one multiply-add is 2 FLOPs; only matmuls count (norms,
activations, softmax, rotary and embedding lookups are left out, as in the PaLM/Megatron MFU
convention). Forward FLOPs per token of a decoder with hidden size d, L layers, q heads
n_q and key/value heads n_kv of size d_h, MLP width d_ff, vocabulary V, at sequence length S:

    attention projections  2 * d * d_h * (2 * n_q + 2 * n_kv)   q and o: n_q heads; k and v: n_kv
    attention scores+values  2 * 2 * n_q * d_h * (S / 2)          q k^T and p v; a causal token
                                                                  attends to S / 2 keys on average
    MLP                     2 * 3 * d * d_ff  (gated: gate, up, down; 2 matrices if not gated;
                            mixture of experts: k active experts of d_ff_expert + the router)
    per layer sum, times L, plus the LM head 2 * d * V (lm_head=True).

Training counts 3x the forward (backward = 2x: gradients of activations and of weights).
The learner needs the LM head only on response tokens and the rollout on generated ones:
`learner_flops` / `rollout_flops` count that.

MFU = achieved FLOP/s / peak FLOP/s. Peaks (`peak_tflops`): NVIDIA's dense datasheet numbers
for known GPUs (`PEAK_TFLOPS`); on CPU (or an unknown GPU) a few seconds' matmul probe,
cached per machine in $RL_CACHE_DIR or ~/.cache/rl-infinite/peak_tflops.json.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

# Dense (no structured sparsity) tensor-core TFLOP/s from NVIDIA's datasheets. fp32 is the
# non-tensor-core rate; tf32 the tensor-core rate for float32 matmuls with TF32 allowed.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM":  {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL":  {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H200":      {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL":  {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "A100 40GB": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A100 80GB": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S":      {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
}

# torch.cuda.get_device_name() substrings -> table key; first match wins (NVL/PCIe before
# the plain names). "NVIDIA H100 80GB HBM3" is the SXM part.
_NAME_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("H200", "NVL"), "H200 NVL"),
    (("H200",), "H200"),
    (("H100", "NVL"), "H100 NVL"),
    (("H100", "PCIE"), "H100 PCIe"),
    (("H100",), "H100 SXM"),
    (("A100", "40GB"), "A100 40GB"),
    (("A100",), "A100 80GB"),
    (("L40S",), "L40S"),
)

_DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                "fp32": "fp32", "float32": "fp32", "float": "fp32", "tf32": "tf32"}

PROBE_SHAPES = ((2048, 576, 1536), (2048, 2048, 2048))
"""(m, k, n) of the probe's matmuls: a SmolLM2-sized MLP projection over 2048 tokens and a
square one (small shapes reach less of a CPU's rate: the peak is the best of the two)."""
PROBE_SHAPE = PROBE_SHAPES[0]


# --- FLOPs ----------------------------------------------------------------------------------

def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


NOT_GATED = {"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi", "starcoder2", "bert"}


def _text_config(config):
    """The language model's config (multimodal configs nest it)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def layer_flops_per_token(config, seq_len: int) -> float:
    """Forward FLOPs per token of ONE decoder layer at sequence length `seq_len` (see the
    module docstring)."""
    c = _text_config(config)
    d = int(c.hidden_size)
    n_q = int(c.num_attention_heads)
    n_kv = int(_get(c, "num_key_value_heads", default=n_q))
    d_h = int(_get(c, "head_dim", default=d // n_q))
    projections = 2 * d * d_h * (2 * n_q + 2 * n_kv)
    attention = 2 * 2 * n_q * d_h * (seq_len / 2)
    matrices = 2 if getattr(c, "model_type", None) in NOT_GATED else 3
    experts = _get(c, "num_experts_per_tok", "moe_topk")
    moe_width = _get(c, "moe_intermediate_size")
    if experts and moe_width:
        mlp = 2 * matrices * d * int(moe_width) * int(experts)
        mlp += 2 * d * int(_get(c, "num_experts", "num_local_experts", default=0))  # router
        shared = _get(c, "shared_expert_intermediate_size")
        if shared:
            mlp += 2 * matrices * d * int(shared)
    else:
        mlp = 2 * matrices * d * int(_get(c, "intermediate_size", "n_inner", default=4 * d))
    return float(projections + attention + mlp)


def lm_head_flops_per_token(config) -> float:
    c = _text_config(config)
    return 2.0 * int(c.hidden_size) * int(c.vocab_size)


def flops_per_token(config, seq_len: int, lm_head: bool = True, training: bool = False) -> float:
    """Forward FLOPs per token of a transformers config at sequence length `seq_len`:
    L * (attention projections + causal attention over seq_len / 2 keys + MLP) + LM head;
    `training`: 3x (forward + backward). See the module docstring for each term."""
    c = _text_config(config)
    total = int(c.num_hidden_layers) * layer_flops_per_token(c, seq_len)
    if lm_head:
        total += lm_head_flops_per_token(c)
    return (3.0 if training else 1.0) * total


def learner_flops(config, prompt_lens: list[int], response_lens: list[int]) -> float:
    """Training FLOPs (forward + backward, 3x) of one update over these sequences: every
    prompt + response token through the decoder at its sequence's length, the LM head on
    response tokens only. Counted per sequence whatever the layout (a shared prompt counts
    once per sample), so layouts that skip work show as a higher rate."""
    body = sum((p + r) * flops_per_token(config, p + r, lm_head=False) for p, r in zip(prompt_lens, response_lens))
    return 3.0 * (body + sum(response_lens) * lm_head_flops_per_token(config))


def rollout_flops(config, prompt_lens: list[int], response_lens: list[int]) -> float:
    """Forward FLOPs of generating these responses: prefill + decode of every token at its
    sequence's length (a token at position i attends to i keys: on average half the final
    length), the LM head on generated tokens. Prefix-cache hits are counted as computed."""
    body = sum((p + r) * flops_per_token(config, p + r, lm_head=False) for p, r in zip(prompt_lens, response_lens))
    return body + sum(response_lens) * lm_head_flops_per_token(config)


# --- peaks ----------------------------------------------------------------------------------

def dtype_name(dtype) -> str:
    """torch.dtype or name -> "bf16" | "fp16" | "fp32" | "tf32"."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    key = _DTYPE_NAMES.get(str(dtype).lower())
    if key is None:
        raise ValueError(f"unknown dtype {dtype!r} for a peak: use bf16, fp16, fp32 or tf32")
    return key


def gpu_table_key(device_name: str) -> str | None:
    """PEAK_TFLOPS key for a torch.cuda.get_device_name() string, None if not in the table."""
    upper = device_name.upper()
    for needles, key in _NAME_RULES:
        if all(n in upper for n in needles):
            return key
    return None


def cache_path() -> Path:
    root = os.environ.get("RL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rl-infinite")
    return Path(root) / "peak_tflops.json"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device: str = "cpu") -> str:
    """Cache key: the CPU model and torch's thread count (a GPU's name for a GPU probe)."""
    if device.startswith("cuda"):
        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    return f"cpu:{cpu_model()}|threads={torch.get_num_threads()}"


def probe_matmul_tflops(dtype: torch.dtype, seconds: float = 2.0, device: str = "cpu",
                        shape: tuple[int, int, int] = PROBE_SHAPE) -> float:
    """Best TFLOP/s of repeated [m, k] @ [k, n] matmuls over about `seconds` (after one
    warm-up): the achievable dense rate of this machine for `dtype`."""
    m, k, n = shape
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, generator=gen, device=device).to(dtype)
    b = torch.randn(k, n, generator=gen, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    start = time.perf_counter()
    reps = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync()
        best = min(best, (time.perf_counter() - t0) / reps)
        if time.perf_counter() - start >= seconds:
            break
        reps = min(reps * 2, 64) if best < 0.01 else reps
    return 2.0 * m * k * n / best / 1e12


def _load_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def probed_peaks(device: str = "cpu", seconds: float = 2.0, refresh: bool = False) -> dict[str, float]:
    """{"bf16": TFLOP/s, "fp32": TFLOP/s} from the cache, else probed (`seconds` per dtype,
    the best over PROBE_SHAPES) and written to the cache. fp16 and tf32 map to bf16 and fp32
    on a probe."""
    path = cache_path()
    key = machine_key(device)
    cache = _load_cache(path)
    entry = cache.get(key)
    if entry and not refresh and {"bf16", "fp32"} <= entry.keys():
        return {k: float(entry[k]) for k in ("bf16", "fp32")}
    each = seconds / len(PROBE_SHAPES)
    peaks = {name: max(probe_matmul_tflops(dtype, each, device, shape) for shape in PROBE_SHAPES)
             for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    cache = _load_cache(path)  # re-read: another process may have written meanwhile
    cache[key] = dict(peaks, shapes=[list(s) for s in PROBE_SHAPES], seconds=seconds,
                      measured_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the probe result still serves this process
    return peaks


def peak_tflops(device="cpu", dtype=torch.bfloat16, probe_seconds: float = 2.0) -> float:
    """Peak dense TFLOP/s of `device` ("cpu", "cuda", "cuda:1" or a torch.device) for matmuls
    in `dtype`: the datasheet table for known NVIDIA GPUs (matched on
    torch.cuda.get_device_name), else the cached matmul probe (`probed_peaks`)."""
    device = str(device)
    name = dtype_name(dtype)
    if device.startswith("cuda"):
        key = gpu_table_key(torch.cuda.get_device_name(torch.device(device)))
        if key is not None:
            return PEAK_TFLOPS[key][name]
    probed = probed_peaks(device, probe_seconds)
    return probed["fp32" if name in ("fp32", "tf32") else "bf16"]


# --- rates ----------------------------------------------------------------------------------

def tflops(flops: float, seconds: float) -> float:
    """Achieved TFLOP/s."""
    return flops / seconds / 1e12 if seconds > 0 else 0.0


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model FLOPs utilization: achieved TFLOP/s over `peak` TFLOP/s (0..1)."""
    return tflops(flops, seconds) / peak if peak > 0 else 0.0


def learner_metrics(config, prompt_lens: list[int], response_lens: list[int], seconds: float,
                    peak: float) -> dict[str, float]:
    """perf/learner_tflops and perf/learner_mfu for an update of these sequences that took
    `seconds` (forward + backward; per rank: pass this rank's sequences and its peak)."""
    flops = learner_flops(config, prompt_lens, response_lens)
    return {"perf/learner_tflops": tflops(flops, seconds), "perf/learner_mfu": mfu(flops, seconds, peak)}


def rollout_metrics(config, prompt_lens: list[int], response_lens: list[int], seconds: float,
                    peak: float) -> dict[str, float]:
    """perf/rollout_tokens_per_s (generated tokens) and perf/rollout_mfu for a rollout of
    these sequences that took `seconds` (peak: the rollout engines' devices together)."""
    flops = rollout_flops(config, prompt_lens, response_lens)
    return {"perf/rollout_tokens_per_s": sum(response_lens) / seconds if seconds > 0 else 0.0,
            "perf/rollout_mfu": mfu(flops, seconds, peak)}


# --- where the time goes: torch.profiler events in categories ---------------------------------

PROFILE_CATEGORIES = ("gemm", "lm_head_logprobs", "attention", "optimizer", "casts", "communication",
                      "other_ops", "python_other")
"""python_other: wall time not inside any profiled op's self time (Python, the autograd
engine's own work, waiting); only with `wall_seconds` and on the CPU side."""

ATTENTION_TAG = "rl.attention"
_GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::mv",
         "aten::addmv", "aten::_scaled_mm", "aten::dot", "aten::_addmm_activation", "aten::addbmm"}
_CASTS = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::_copy_from", "aten::_copy_from_and_resize",
          "aten::type_as"}
_COMM = ("nccl", "gloo", "c10d", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter",
         "broadcast", "_allgather_base", "record_param_comms")
_ATTN = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention", "flash_attn")
_SOFTMAX = {"aten::softmax", "aten::_softmax", "aten::_softmax_backward_data"}  # eager attention's
_LOG_SOFTMAX = {"aten::log_softmax", "aten::_log_softmax", "aten::_log_softmax_backward_data"}  # the LM head's


def op_category(name: str, ancestors: tuple[str, ...] = ()) -> str:
    """Category of a profiled op from its name and its enclosing ranges' names (innermost
    last): the LM head (log_softmax, or inside rl.logprobs.PROFILE_TAG ranges) > optimizer
    step > communication > attention (SDPA/flash kernels, softmax, or inside an
    ATTENTION_TAG range) > GEMM > casts > other."""
    chain = ancestors + (name,)
    if name in _LOG_SOFTMAX or any(n.startswith("rl.lm_head_logprobs") for n in chain):
        return "lm_head_logprobs"
    if any(n.startswith("Optimizer.step") or "adam" in n.lower() for n in chain):
        return "optimizer"
    lower = name.lower()
    if any(c in lower for c in _COMM):
        return "communication"
    if name in _SOFTMAX or any(a in lower for a in _ATTN) or any(n.startswith(ATTENTION_TAG) for n in chain):
        return "attention"
    if name in _GEMM:
        return "gemm"
    if name in _CASTS:
        return "casts"
    return "other_ops"


def _device_self_us(event) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, attr, None)
        if value is not None:
            return float(value)
    return 0.0


def profile_categories(prof, wall_seconds: float | None = None) -> dict:
    """Self CPU (and device) seconds per category of a finished torch.profiler.profile.

    Each op counts its SELF time (children excluded), so nothing is counted twice; a
    record_function range's own self time (Python between its ops) goes to "other_ops"
    unless it is one of the tagged ranges. Returns {"cpu_s": {category: s}, "device_s":
    {category: s}, "cpu_fraction": {...}, "device_fraction": {...}, "wall_s": wall}.
    """
    cpu = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
    device = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
    from torch.autograd import DeviceType

    for event in prof.events():
        # CPU-side ops only: an op's self device time already holds its kernels; the kernels'
        # and GPU-side ranges' own events would count the same time again
        if getattr(event, "is_async", False) or getattr(event, "device_type", DeviceType.CPU) != DeviceType.CPU:
            continue
        ancestors = []
        parent = event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        cat = op_category(event.name, tuple(reversed(ancestors)))
        cpu[cat] += event.self_cpu_time_total / 1e6
        device[cat] += _device_self_us(event) / 1e6
    if wall_seconds is not None:
        cpu["python_other"] = max(0.0, wall_seconds - sum(cpu.values()))
    cpu_total = sum(cpu.values()) or 1.0
    device_total = sum(device.values())
    return {"cpu_s": cpu, "device_s": device, "wall_s": wall_seconds,
            "cpu_fraction": {k: v / cpu_total for k, v in cpu.items()},
            "device_fraction": {k: (v / device_total if device_total else 0.0) for k, v in device.items()}}


class tag_attention:
    """Context manager: forward hooks that wrap every module whose class name ends with
    "Attention" in a record_function(ATTENTION_TAG) range, so `profile_categories` counts
    eager attention's matmuls as attention (forward only: backward ops run outside it)."""

    def __init__(self, model):
        self.model, self.handles = model, []

    def __enter__(self):
        from torch.profiler import record_function

        def pre(module, args, kwargs=None):
            ctx = record_function(ATTENTION_TAG)
            ctx.__enter__()
            module.__dict__.setdefault("_rl_profile_ranges", []).append(ctx)

        def post(module, args, output):
            ranges = module.__dict__.get("_rl_profile_ranges")
            if ranges:
                ranges.pop().__exit__(None, None, None)

        for module in self.model.modules():
            if type(module).__name__.endswith("Attention"):
                self.handles.append(module.register_forward_pre_hook(pre))
                self.handles.append(module.register_forward_hook(post))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False


def format_categories(result: dict) -> str:
    """A small text table of `profile_categories` output."""
    has_device = sum(result["device_s"].values()) > 0
    lines = [f"{'category':18s} {'cpu s':>9s} {'cpu %':>6s}" + (f" {'device s':>9s} {'dev %':>6s}" if has_device else "")]
    for cat in PROFILE_CATEGORIES:
        line = f"{cat:18s} {result['cpu_s'][cat]:9.4f} {100 * result['cpu_fraction'][cat]:6.1f}"
        if has_device:
            line += f" {result['device_s'][cat]:9.4f} {100 * result['device_fraction'][cat]:6.1f}"
        lines.append(line)
    if result.get("wall_s") is not None:
        lines.append(f"{'wall':18s} {result['wall_s']:9.4f}")
    return "\n".join(lines)
