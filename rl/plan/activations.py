"""The learner's activation memory: bytes per token and layer, the largest micro-batch of the
configured layout (with or without gradient checkpointing), and the chunked head's buffers."""

from __future__ import annotations

import math

from rl.plan.architectures import Architecture
from rl.plan.results import Item


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
    # (rl/chunked_head.py): d hidden [K, H] fp32 formed in the forward, and under 16-bit autocast
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
    """rl.chunked_head.CHUNK_ELEMENTS (rl.logprobs.CHUNK_ELEMENTS) for `device` (elements of
    one head chunk)."""
    from rl import chunked_head

    budget = chunked_head.CHUNK_ELEMENTS
    if isinstance(budget, dict):
        return int(budget.get(device, budget.get("default", 1 << 22)))
    return int(budget)
