"""Per-token log-probs of responses under a causal LM, on padded or packed micro-batches.

Both layouts return the objective-facing tensors in the same shape: log-probs [n, T] with
each response right-aligned in the last columns, mask [n, T], so objectives never see the
layout.

padded: every row is left-padded to the micro-batch's longest prompt+response, so all
responses end at the last column. The model only needs logits for the last T + 1 positions
(`logits_to_keep`), not the prompts'.

    input_ids [n, L]   attention_mask [n, L]   response mask [n, T] (right-aligned)

packed: the n sequences sit back to back in ONE row of S = sum(L_i) tokens, no padding.
`position_ids` restart at 0 at each sequence and `attention_mask` is None, which makes
transformers' `create_causal_mask` build a block-diagonal causal mask
(`masking_utils.find_packed_sequence_indices`). `logits_to_keep` is the 1-D tensor of the K
positions whose logits predict a response token, so the lm_head and the log-softmax run on
response tokens only; the K log-probs are scattered (differentiably) into [n, T].

    input_ids [1, S]   position_ids [1, S]   logits_index [K]   dest_rows/dest_cols [K]

shared_prompt: the G samples of a GRPO group share their prompt, so each distinct prompt runs
ONCE per update (pass 1, `SharedPrompts`: left-padded, `use_cache=True`). Its KV cache and
last-position logits are cut from the graph as leaf tensors; response micro-batches (pass 2,
`ResponseMicroBatch`, grouped by response length like the padded layout) select their
prompts' rows of that cache and run only response tokens. Each micro-batch's backward adds
into the leaves' gradients, and `SharedPrompts.backward()` sends the sums through pass 1 once.
Same gradient as the padded layout; the model processes sum_k P_k + sum_i (T_i - 1) tokens
(+ padding) instead of sum_i (P_i + T_i).

    pass 1: prompt_ids [k, P]  ->  keys/values [k, heads, P, d] per layer, first logits [k, V]
    pass 2: prompt_rows [n], continuation_ids [n, T - 1] (responses left-aligned minus their
            last token) against the selected cache rows

The lm_head and log-softmax (every layout, the default): only the K positions that predict a
response token go through the head, and never as a full [K, V] float32 tensor.
`chunked_head_logprobs` is one autograd Function over the decoder's hidden states [K, H] and
the head weight [V, H]. Its forward takes token chunks of [k, V] logits (the matmul in the
compute dtype, bf16 under autocast, then log-softmax, target log-prob and entropy in float32
on the chunk) and, since d logp / d logits = onehot - softmax does not depend on the upstream
gradient g, already forms d hidden / g = -(softmax - onehot) W per token. For the head
weight's gradient it keeps E = softmax - onehot in bf16 [K, V] ("stored", the 16-bit default:
one matmul in the backward) or only the hidden states and one logsumexp per token
("recompute": the logits recomputed in vocabulary chunks; the float32 default).
`chunked_logits_logprobs` does the float32 work in token chunks on logits that already exist
(models that scale or soft-cap logits, FSDP-sharded models, a head that is not a plain
Linear, the first logits of the shared_prompt layout). `response_logprobs(..., chunked=False)`
or `USE_CHUNKED = False` runs the previous full-logits path (A/B, tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class _TokenCounts:
    """Counts shared by the padded and packed layouts (they hold `input_ids` and `response_mask`)."""

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def num_processed_tokens(self) -> int:
        """Tokens the model runs over, padding included."""
        return self.input_ids.numel()

    @property
    def num_real_tokens(self) -> int:
        """Processed tokens that are not padding."""
        mask = getattr(self, "attention_mask", None)
        return int(mask.sum()) if mask is not None else self.input_ids.numel()


@dataclass
class MicroBatch(_TokenCounts):
    """Padded layout."""

    input_ids: Tensor       # [n, L] long, left-padded
    attention_mask: Tensor  # [n, L] long
    position_ids: Tensor    # [n, L] long, 0 at each row's first real token
    response_ids: Tensor    # [n, T] long, right-aligned, pad where mask is false
    response_mask: Tensor   # [n, T] bool


@dataclass
class PackedMicroBatch(_TokenCounts):
    """Packed layout: one row, no padding."""

    input_ids: Tensor      # [1, S] long, sequences back to back
    position_ids: Tensor   # [1, S] long, restarting at 0 for each sequence
    logits_index: Tensor   # [K] long, positions whose logits predict a response token
    targets: Tensor        # [K] long, the response token each of those positions predicts
    dest_rows: Tensor      # [K] long, where each log-prob goes in [n, T]
    dest_cols: Tensor      # [K] long
    response_ids: Tensor   # [n, T] long, right-aligned (as in MicroBatch)
    response_mask: Tensor  # [n, T] bool

    attention_mask = None  # the block-diagonal mask comes from position_ids


@dataclass
class ResponseMicroBatch:
    """shared_prompt layout, pass 2: responses whose prompts ran in `shared`."""

    shared: "SharedPrompts"
    prompt_rows: Tensor        # [n] long, row of each response's prompt in `shared`
    continuation_ids: Tensor   # [n, T - 1] long, response tokens 0..T-2, left-aligned, pad right
    continuation_mask: Tensor  # [n, T - 1] long
    response_lengths: Tensor   # [n] long
    response_ids: Tensor       # [n, T] long, right-aligned (as in MicroBatch)
    response_mask: Tensor      # [n, T] bool

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def num_processed_tokens(self) -> int:
        """Tokens pass 2 runs over, padding included (pass 1 counts in `shared`)."""
        return self.continuation_ids.numel()

    @property
    def num_real_tokens(self) -> int:
        return int(self.continuation_mask.sum())


def right_align(rows: list[list[float]], width: int, fill: float = 0.0,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """Right-align variable-length rows into a [len(rows), width] tensor."""
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, width - len(row):] = torch.as_tensor(row, dtype=dtype)
    return out


def _right_aligned_responses(responses: list[list[int]], T: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """response_ids [n, T] long (right-aligned, pad elsewhere) and response_mask [n, T] bool."""
    response_ids = right_align([list(map(float, r)) for r in responses], T, pad_id, torch.long)
    response_mask = right_align([[1.0] * len(r) for r in responses], T, 0, torch.long).bool()
    return response_ids, response_mask


def make_micro_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> MicroBatch:
    """Build the left-padded layout from token-id lists (responses may be empty)."""
    full = [p + r for p, r in zip(prompts, responses)]
    width = max(len(x) for x in full)
    T = max(1, max(len(r) for r in responses))
    input_ids = right_align([list(map(float, x)) for x in full], width, pad_id, torch.long)
    attention_mask = right_align([[1.0] * len(x) for x in full], width, 0, torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    response_ids, response_mask = _right_aligned_responses(responses, T, pad_id)
    return MicroBatch(input_ids, attention_mask, position_ids, response_ids, response_mask)


def make_packed_micro_batch(prompts: list[list[int]], responses: list[list[int]],
                            pad_id: int) -> PackedMicroBatch:
    """Build the packed layout. Every prompt must be non-empty (its last token predicts the
    first response token)."""
    T = max(1, max(len(r) for r in responses))
    ids: list[int] = []
    pos: list[int] = []
    logits_index: list[int] = []
    dest_rows: list[int] = []
    dest_cols: list[int] = []
    for row, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError("packed layout needs a non-empty prompt for every sequence")
        start = len(ids)
        ids += p + r
        pos += range(len(p) + len(r))
        # Response token j sits at start + len(p) + j and is predicted by the position before it.
        first = start + len(p) - 1
        logits_index += range(first, first + len(r))
        dest_rows += [row] * len(r)
        dest_cols += range(T - len(r), T)
    response_ids, response_mask = _right_aligned_responses(responses, T, pad_id)
    targets = response_ids[dest_rows, dest_cols] if dest_rows else torch.zeros(0, dtype=torch.long)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return PackedMicroBatch(as_long([ids]), as_long([pos]), as_long(logits_index), targets,
                            as_long(dest_rows), as_long(dest_cols), response_ids, response_mask)


def make_response_micro_batch(shared: "SharedPrompts", prompt_rows: list[int],
                             responses: list[list[int]], pad_id: int) -> ResponseMicroBatch:
    """Pass-2 micro-batch: `responses[i]` continues prompt row `prompt_rows[i]` of `shared`."""
    T = max(1, max(len(r) for r in responses))
    continuation_ids = torch.full((len(responses), T - 1), pad_id, dtype=torch.long)
    continuation_mask = torch.zeros((len(responses), T - 1), dtype=torch.long)
    for i, r in enumerate(responses):
        head = r[:-1]
        if head:
            continuation_ids[i, :len(head)] = torch.as_tensor(head, dtype=torch.long)
            continuation_mask[i, :len(head)] = 1
    response_ids, response_mask = _right_aligned_responses(responses, T, pad_id)
    return ResponseMicroBatch(shared, torch.tensor(prompt_rows, dtype=torch.long), continuation_ids,
                              continuation_mask, torch.tensor([len(r) for r in responses], dtype=torch.long),
                              response_ids, response_mask)


LAYOUTS = ("padded", "packed", "shared_prompt")


def build_micro_batch(layout: str, prompts: list[list[int]], responses: list[list[int]],
                      pad_id: int) -> MicroBatch | PackedMicroBatch:
    """`layout` is "padded" or "packed"."""
    if layout == "packed":
        return make_packed_micro_batch(prompts, responses, pad_id)
    if layout == "padded":
        return make_micro_batch(prompts, responses, pad_id)
    if layout == "shared_prompt":
        raise ValueError("shared_prompt micro-batches come from SharedPrompts + make_response_micro_batch")
    raise ValueError(f"unknown micro-batch layout {layout!r}: use one of {', '.join(LAYOUTS)}")


# --- the lm_head and log-softmax in chunks (forward and backward) ---------------------------

USE_CHUNKED = True
"""Default path of `response_logprobs`: chunked head + log-softmax. False: full logits."""

HEAD_BACKWARD = "auto"
"""What the chunked head keeps for the head weight's gradient. "stored": E = softmax - onehot
[K, V] in the compute dtype (bf16 under autocast), so the backward is one matmul E^T (g H);
"recompute": only hidden [K, H] and one logsumexp per token, the backward recomputing the
logits in vocabulary chunks (one more head matmul, no [K, V] tensor kept). "auto": stored
when the compute dtype is 16-bit, recompute in float32 (where E would be a float32 [K, V])."""

CHUNK_ELEMENTS: int | dict[str, int] = {"cpu": 1 << 22, "default": 1 << 26}
"""Elements of one chunk's float32 buffers, per device type ("default": any other; an int
sets all): token chunks of CHUNK_ELEMENTS // V rows in the forward, vocabulary chunks of
CHUNK_ELEMENTS // K columns in the recompute backward (at least MIN_CHUNK of either).
CPU: 16 MiB, small enough for the allocator to reuse memory instead of mapping fresh pages
per chunk (the fastest of 2^20..2^24 on a 2-core CPU, 49k vocabulary); GPU: 256 MiB, so the
head matmuls keep hundreds of rows (64-row chunks ran the head at a third of the rate)."""

MIN_CHUNK = 64

PROFILE_TAG = "rl.lm_head_logprobs"
"""torch.profiler range around the chunked head + log-softmax, forward and backward."""


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the head matmul runs in: autocast's when it is on (as the model's own
    lm_head would), else the inputs' promoted dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk(other: int, chunk: int | None, device: torch.device) -> int:
    """Chunk length along one axis when the other axis has `other` elements."""
    if chunk is not None:
        return max(1, int(chunk))
    budget = CHUNK_ELEMENTS
    if isinstance(budget, dict):
        budget = budget.get(device.type, budget["default"])
    return max(MIN_CHUNK, budget // max(1, other))


def _log_softmax_rows(z: Tensor, temperature: float, owned: bool) -> Tensor:
    """log_softmax(z / T) in float32 for logits z [k, V] of any float dtype (a new tensor;
    z itself is overwritten only when `owned`)."""
    zf = z.float()
    if temperature != 1.0:
        zf = zf.div_(temperature) if (owned or zf is not z) else zf / temperature
    return torch.log_softmax(zf, dim=-1)


def _stats_rows(logp_all: Tensor, targets: Tensor, with_entropy: bool, want_e: bool,
                logp_out: Tensor, ent_out: Tensor | None) -> Tensor | None:
    """From log-probs [k, V] (float32, consumed): target log-probs and entropies into the [k]
    outputs; returns E = softmax - onehot(target) [k, V] float32 when `want_e`."""
    idx = targets.unsqueeze(-1)
    logp_out.copy_(logp_all.gather(-1, idx).squeeze(-1))
    if not (with_entropy or want_e):
        return None
    p = logp_all.exp()
    if ent_out is not None:  # -sum p log p, as the full-logits path computes it
        ent_out.copy_(logp_all.mul_(p).sum(-1).neg_())
    if not want_e:
        return None
    return p.scatter_add_(-1, idx, torch.full_like(idx, -1.0, dtype=p.dtype))


def _probs_minus_onehot(z: Tensor, targets: Tensor, lse: Tensor, temperature: float,
                        col0: int) -> Tensor:
    """E = softmax(z / T) - onehot(target) for logits z [k, v] of vocabulary columns
    col0..col0+v, from the rows' float32 logsumexp of z / T [k] (recompute backward)."""
    zf = z.float()
    if temperature != 1.0:
        zf = zf.div_(temperature) if zf is not z else zf / temperature
    elif zf is z:
        zf = zf.clone()
    e = zf.sub_(lse.unsqueeze(-1)).exp_()
    width = e.shape[1]
    col = targets - col0
    inside = (col >= 0) & (col < width)
    # scatter_add with the outside rows' values zeroed: no host sync for a nonzero()
    minus_one = torch.where(inside, -1.0, 0.0).to(e.dtype)
    return e.scatter_add_(1, col.clamp(0, width - 1).unsqueeze(-1), minus_one.unsqueeze(-1))


class _HeadLogprobs(torch.autograd.Function):
    """(hidden [K, H], weight [V, H], bias [V] | None, targets [K]) -> log-probs [K] float32
    (and entropies [K], no gradient); see `chunked_head_logprobs`.

    With z = (h W^T + b) / T and upstream gradient g [K]: d logp / d z = onehot - softmax =
    -E, so d hidden = -(g / T) (E W), computed in the forward as U = E W [K, H] (linear in g),
    d W = E^T (-(g / T) H) and d b = E^T (-(g / T)): only those two need E in the backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy, dtype, needs,
                stored, chunk_tokens, chunk_vocab):
        from torch.profiler import record_function

        need_h, need_w, need_b = needs
        keep_e = stored and (need_w or need_b)
        with record_function(PROFILE_TAG), torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            K, V = h.shape[0], w.shape[0]
            f32 = dict(dtype=torch.float32, device=h.device)
            logp = torch.empty(K, **f32)
            ent = torch.empty(K, **f32) if with_entropy else None
            lse = torch.empty(K, **f32) if (need_w or need_b) and not stored else None
            u = torch.empty(K, h.shape[1], **f32) if need_h else None
            e_all = torch.empty(K, V, dtype=dtype, device=h.device) if keep_e else None
            step = _chunk(V, chunk_tokens, h.device)
            for s in range(0, K, step):
                e_ = min(K, s + step)
                t = targets[s:e_]
                z = torch.mm(h[s:e_], w.t()) if b is None else torch.addmm(b, h[s:e_], w.t())
                if lse is not None:  # logsumexp of z / T = z_target / T - logp_target
                    lse[s:e_] = z.gather(-1, t.unsqueeze(-1)).squeeze(-1).float() / temperature
                logp_all = _log_softmax_rows(z, temperature, owned=True)  # may overwrite z
                del z
                e = _stats_rows(logp_all, t, with_entropy, need_h or keep_e, logp[s:e_],
                                ent[s:e_] if ent is not None else None)
                del logp_all
                if lse is not None:
                    lse[s:e_] -= logp[s:e_]
                if e is None:
                    continue
                if keep_e:
                    e_all[s:e_] = e
                    e = e_all[s:e_]
                else:
                    e = e.to(dtype)
                if need_h:
                    u[s:e_] = torch.mm(e, w)
                del e
        ctx.save_for_backward(h, w, b, targets, u, lse, e_all)
        ctx.temperature, ctx.chunk_vocab = temperature, chunk_vocab
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        from torch.profiler import record_function

        h, w, b, targets, u, lse, e_all = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = grad_w = grad_b = None
        with record_function(PROFILE_TAG + ".backward"), torch.autocast(h.device.type, enabled=False):
            K, V = h.shape[0], w.shape[0]
            neg_g = grad_logp.float() / -ctx.temperature  # -(g / T)
            if need_h:
                grad_h = (u * neg_g.unsqueeze(-1)).to(ctx.dtypes[0])
            if need_w or need_b:
                gh = (h.float() * neg_g.unsqueeze(-1)).to(h.dtype) if need_w else None
                if e_all is not None:  # stored: one matmul
                    if need_w:
                        grad_w = torch.mm(e_all.t(), gh).to(ctx.dtypes[1])
                    if need_b:
                        grad_b = torch.cat([torch.mv(e_all[:, v:v + 4096].float().t(), neg_g)
                                            for v in range(0, V, 4096)]).to(ctx.dtypes[2])
                else:  # recompute the logits in vocabulary chunks: each weight row's gradient once
                    grad_w = torch.empty(V, w.shape[1], dtype=ctx.dtypes[1], device=w.device) if need_w else None
                    grad_b = torch.empty(V, dtype=ctx.dtypes[2], device=w.device) if need_b else None
                    step = _chunk(K, ctx.chunk_vocab, h.device)
                    for v0 in range(0, V, step):
                        v1 = min(V, v0 + step)
                        wv = w[v0:v1]
                        z = torch.mm(h, wv.t()) if b is None else torch.addmm(b[v0:v1], h, wv.t())
                        e = _probs_minus_onehot(z, targets, lse, ctx.temperature, v0)
                        del z
                        if need_b:
                            grad_b[v0:v1] = torch.mv(e.t(), neg_g)
                        if need_w:
                            grad_w[v0:v1] = torch.mm(e.to(h.dtype).t(), gh)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


class _LogitsLogprobs(torch.autograd.Function):
    """(logits [K, V], targets [K]) -> log-probs [K] float32 (and entropies [K]); see
    `chunked_logits_logprobs`. Keeps the logits and one logsumexp per token; the backward
    recomputes the softmax per token chunk."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy, chunk_tokens):
        from torch.profiler import record_function

        with record_function(PROFILE_TAG), torch.autocast(logits.device.type, enabled=False):
            K, V = logits.shape
            f32 = dict(dtype=torch.float32, device=logits.device)
            logp, lse = torch.empty(K, **f32), torch.empty(K, **f32)
            ent = torch.empty(K, **f32) if with_entropy else None
            step = _chunk(V, chunk_tokens, logits.device)
            for s in range(0, K, step):
                e = min(K, s + step)
                z, t = logits[s:e], targets[s:e]
                logp_all = _log_softmax_rows(z, temperature, owned=False)
                _stats_rows(logp_all, t, with_entropy, False, logp[s:e], ent[s:e] if ent is not None else None)
                del logp_all
                lse[s:e] = z.gather(-1, t.unsqueeze(-1)).squeeze(-1).float() / temperature - logp[s:e]
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature, ctx.step = temperature, step
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        from torch.profiler import record_function

        logits, targets, lse = ctx.saved_tensors
        with record_function(PROFILE_TAG + ".backward"), torch.autocast(logits.device.type, enabled=False):
            neg_g = grad_logp.float() / -ctx.temperature
            grad = torch.empty_like(logits)
            for s in range(0, logits.shape[0], ctx.step):
                e = min(logits.shape[0], s + ctx.step)
                grad[s:e] = _probs_minus_onehot(logits[s:e], targets[s:e], lse[s:e], ctx.temperature, 0
                                                ).mul_(neg_g[s:e].unsqueeze(-1))
        return grad, None, None, None, None


def chunked_head_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float = 1.0,
                          with_entropy: bool = False, bias: Tensor | None = None,
                          chunk_tokens: int | None = None, chunk_vocab: int | None = None,
                          backward: str | None = None) -> tuple[Tensor, Tensor | None]:
    """log_softmax((hidden @ weight.T + bias) / temperature) at `targets`, without a [K, V]
    float32 tensor: hidden [K, H], weight [V, H], targets [K] -> log-probs [K] float32 (and
    entropies [K] float32, no gradient).

    Differentiable w.r.t. hidden, weight and bias. The matmul runs in autocast's dtype when
    autocast is on (bf16 logits with fp32 accumulation, as the model's lm_head would give),
    the softmax statistics in float32 per token chunk of `chunk_tokens` rows (default
    CHUNK_ELEMENTS // V). The gradient of hidden is formed in the forward (it is linear in the
    upstream gradient); `backward` ("stored" | "recompute", default HEAD_BACKWARD) chooses
    what the weight's gradient comes from (see HEAD_BACKWARD); `chunk_vocab` is the
    recompute backward's vocabulary chunk (default CHUNK_ELEMENTS // K).
    """
    if hidden.shape[0] == 0:
        logp = hidden.sum(-1).float()  # [0], still attached to the graph
        return logp, (hidden.new_zeros(0, dtype=torch.float32) if with_entropy else None)
    dtype = _compute_dtype(hidden, weight)
    mode = backward or HEAD_BACKWARD
    if mode == "auto":
        mode = "stored" if dtype in (torch.bfloat16, torch.float16) else "recompute"
    if mode not in ("stored", "recompute"):
        raise ValueError(f"chunked head backward {mode!r}: use stored, recompute or auto")
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    return _HeadLogprobs.apply(hidden, weight, bias, targets, float(temperature), bool(with_entropy),
                               dtype, needs, mode == "stored", chunk_tokens, chunk_vocab)


def chunked_logits_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0,
                            with_entropy: bool = False,
                            chunk_tokens: int | None = None) -> tuple[Tensor, Tensor | None]:
    """log_softmax(logits / temperature) at `targets` for logits that exist already [K, V]
    (any float dtype): the float32 work per token chunk, the gradient written in the logits'
    dtype. Log-probs [K] float32 (and entropies [K], no gradient)."""
    if logits.shape[0] == 0:
        return logits.sum(-1).float(), (logits.new_zeros(0, dtype=torch.float32) if with_entropy else None)
    return _LogitsLogprobs.apply(logits, targets, float(temperature), bool(with_entropy), chunk_tokens)


# --- response log-probs per layout ---------------------------------------------------------

def _token_logprobs(logits: Tensor, targets: Tensor, temperature: float,
                    with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """Full-logits path: logits [..., V], targets [...] -> log-probs [...] (and entropies
    [...], no gradient), through a float32 copy of all the logits."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def response_logprobs(model, mb: MicroBatch | PackedMicroBatch | ResponseMicroBatch, temperature: float = 1.0,
                      with_entropy: bool = False, chunked: bool | None = None) -> tuple[Tensor, Tensor | None]:
    """Log-probs [n, T] of the response tokens (and entropies [n, T], no gradient).

    Logits are divided by `temperature` so the learner scores the distribution the rollout
    sampled from. Masked positions hold 0. Same result for every layout.
    chunked (default USE_CHUNKED): the head and log-softmax on response positions only, in
    chunks (`chunked_head_logprobs`); False: the full-logits path.
    """
    chunked = USE_CHUNKED if chunked is None else chunked
    if isinstance(mb, PackedMicroBatch):
        return _packed_logprobs(model, mb, temperature, with_entropy, chunked)
    if isinstance(mb, ResponseMicroBatch):
        return _response_logprobs(model, mb, temperature, with_entropy, chunked)
    T = mb.response_ids.shape[1]
    kwargs = dict(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                  position_ids=mb.position_ids, use_cache=False)
    if chunked:
        index = torch.nonzero(mb.response_mask, as_tuple=True)  # (rows, cols) of the K response tokens
        # Column j of the last T + 1 positions predicts response column j (as logits_to_keep).
        select = lambda x: x[:, -(T + 1):][:, :T][index]  # noqa: E731
        flat_logp, flat_ent = _positions_logprobs(model, kwargs, select, select, T + 1,
                                                  mb.response_ids[index], temperature, with_entropy)
        return _scatter_rows(flat_logp, flat_ent, *mb.response_mask.shape, index)
    out = model(**kwargs, logits_to_keep=T + 1)
    # Logit column j predicts the token in column j + 1: the first T predict the response.
    logp, entropy = _token_logprobs(out.logits[:, :T], mb.response_ids, temperature, with_entropy)
    logp = logp.masked_fill(~mb.response_mask, 0.0)
    if entropy is not None:
        entropy = entropy.masked_fill(~mb.response_mask, 0.0)
    return logp, entropy


def _sharded(model) -> bool:
    """FSDP-sharded root: its weights (embeddings, norm, head) exist whole only inside the
    model's own forward, so the decoder and the head cannot be called on their own."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return False
    return isinstance(model, FSDPModule)


def _linear_params(head) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) of a plain nn.Linear head (no hooks, no LoRA wrapper, not sharded)."""
    if type(head) is not torch.nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    if type(head.weight) is not torch.nn.Parameter and type(head.weight) is not Tensor:
        return None  # a DTensor or another tensor subclass
    return head.weight, head.bias


def _positions_logprobs(model, kwargs: dict, select_hidden, select_logits, logits_to_keep,
                        targets: Tensor, temperature: float,
                        with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """Chunked log-probs [K] of `targets` at the positions `select_*` picks from the
    decoder's hidden states [.., H] (or, for models whose logits are not a plain head of
    them, from the model's logits [.., V])."""
    parts = None if _sharded(model) else _decoder_and_head(model)
    if parts is not None:
        hidden = select_hidden(parts[0](**kwargs).last_hidden_state)  # [K, H]
        params = _linear_params(parts[1])
        if params is not None:
            return chunked_head_logprobs(hidden, params[0], targets, temperature, with_entropy, bias=params[1])
        logits = parts[1](hidden)
    else:
        if logits_to_keep is not None:
            kwargs = dict(kwargs, logits_to_keep=logits_to_keep)
        logits = select_logits(model(**kwargs).logits)
    return chunked_logits_logprobs(logits, targets, temperature, with_entropy)


def _scatter_rows(flat_logp: Tensor, flat_ent: Tensor | None, n: int, T: int,
                  index: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """[K] values -> [n, T] at (rows, cols) = index, 0 elsewhere. index_put (not in place on a
    leaf) keeps the autograd path from [n, T] back to [K]."""
    logp = flat_logp.new_zeros(n, T).index_put(index, flat_logp)
    entropy = flat_ent.new_zeros(n, T).index_put(index, flat_ent) if flat_ent is not None else None
    return logp, entropy


def _packed_logprobs(model, mb: PackedMicroBatch, temperature: float,
                     with_entropy: bool, chunked: bool = False) -> tuple[Tensor, Tensor | None]:
    # use_cache=False matters: with a cache object transformers skips packed-sequence
    # detection and would let sequences attend to each other.
    kwargs = dict(input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=None, use_cache=False)
    if chunked:
        flat_logp, flat_ent = _positions_logprobs(
            model, kwargs, lambda x: x[0, mb.logits_index], lambda x: x[0], mb.logits_index,
            mb.targets, temperature, with_entropy)
    else:
        out = model(**kwargs, logits_to_keep=mb.logits_index)
        flat_logp, flat_ent = _token_logprobs(out.logits[0], mb.targets, temperature, with_entropy)  # [K]
    return _scatter_rows(flat_logp, flat_ent, *mb.response_mask.shape, (mb.dest_rows, mb.dest_cols))


class SharedPrompts:
    """Pass 1 of the shared_prompt layout: distinct prompts run once, for any number of
    response micro-batches; one backward through pass 1 at the end (`backward`).

    Under `torch.no_grad()` the leaves need no gradient and `backward` does nothing.
    """

    def __init__(self, model, prompts: list[list[int]], pad_id: int):
        if any(not p for p in prompts):
            raise ValueError("shared_prompt layout needs a non-empty prompt for every sequence")
        rows = make_micro_batch(prompts, [[] for _ in prompts], pad_id)  # left-padded prompts
        device = next(model.parameters()).device
        ids, mask = rows.input_ids.to(device), rows.attention_mask.to(device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=rows.position_ids.to(device),
                    use_cache=True, logits_to_keep=1)
        layers = getattr(out.past_key_values, "layers", None)
        if layers is None:
            raise TypeError(f"shared_prompt layout: unsupported cache {type(out.past_key_values).__name__}")
        self.config = model.config
        self.prompt_mask = mask                                   # [k, P]
        self.num_processed_tokens = ids.numel()
        self.num_real_tokens = int(mask.sum())
        self._outputs = [out.logits[:, -1]] + [t for layer in layers for t in (layer.keys, layer.values)]
        # float32 leaves: gradients from many micro-batches accumulate without bf16 rounding
        # (an output without grad_fn, e.g. layer 0's keys under LoRA on q/v only, gets none)
        self._leaves = [t.detach().float().requires_grad_(t.requires_grad) for t in self._outputs]
        self.first_logits = self._leaves[0]                      # [k, V]
        self.kv = [(self._leaves[1 + 2 * i], self._leaves[2 + 2 * i]) for i in range(len(layers))]

    def cache_for(self, rows: Tensor):
        """A fresh cache holding the prompt rows `rows` [n] (differentiable w.r.t. the leaves)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        for i, (keys, values) in enumerate(self.kv):
            cache.update(keys.index_select(0, rows), values.index_select(0, rows), i)
        return cache

    def backward(self) -> None:
        """Send the gradients gathered on the leaves through pass 1, once; then drop pass 1."""
        pairs = [(o, leaf.grad.to(o.dtype)) for o, leaf in zip(self._outputs, self._leaves)
                 if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        self._outputs, self._leaves, self.kv, self.first_logits = [], [], [], None




def _decoder_and_head(model):
    """(decoder, lm_head) when the logits are exactly lm_head(decoder's last hidden state), so
    the head can run on chosen positions only; None for models that scale or soft-cap logits."""
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return (decoder, head) if decoder is not None and head is not None else None


def _response_logprobs(model, mb: ResponseMicroBatch, temperature: float,
                       with_entropy: bool, chunked: bool = False) -> tuple[Tensor, Tensor | None]:
    shared = mb.shared
    n, T = mb.response_mask.shape
    lengths = mb.response_lengths
    # Token 0 of each response is predicted by its prompt's last position (pass 1).
    rows = torch.nonzero(lengths > 0).squeeze(1)                          # [n0]
    logits = [shared.first_logits.index_select(0, mb.prompt_rows[rows])]  # [n0, V]
    cols = [T - lengths[rows]]  # right-aligned column of token 0
    all_rows = [rows]
    flat = []  # chunked: log-probs (and entropies) per part
    if chunked:
        first = mb.response_ids[rows, cols[0]]
        flat.append(chunked_logits_logprobs(logits.pop(), first, temperature, with_entropy))
    if T > 1:
        prompt_mask = shared.prompt_mask.index_select(0, mb.prompt_rows)  # [n, P]
        position_ids = prompt_mask.sum(-1, keepdim=True) + torch.arange(T - 1, device=lengths.device)
        kwargs = dict(input_ids=mb.continuation_ids, position_ids=position_ids,
                      attention_mask=torch.cat([prompt_mask, mb.continuation_mask], dim=1),
                      past_key_values=shared.cache_for(mb.prompt_rows), use_cache=True)
        # Continuation position j of row i predicts token j + 1: real where j < len_i - 1,
        # which is exactly continuation_mask.
        r, j = torch.nonzero(mb.continuation_mask, as_tuple=True)  # [K]
        col = T - lengths[r] + j + 1
        if chunked:
            select = lambda x: x[r, j]  # noqa: E731
            flat.append(_positions_logprobs(model, kwargs, select, select, None,
                                            mb.response_ids[r, col], temperature, with_entropy))
        else:
            parts = _decoder_and_head(model)
            if parts is not None:  # the lm_head and log-softmax on real positions only
                hidden = parts[0](**kwargs).last_hidden_state  # [n, T - 1, H]
                logits.append(parts[1](hidden[r, j]))          # [K, V]
            else:
                logits.append(model(**kwargs).logits[r, j])
        all_rows.append(r)
        cols.append(col)
    rows_cat, cols_cat = torch.cat(all_rows), torch.cat(cols)
    if chunked:
        flat_logp = torch.cat([lp for lp, _ in flat])
        flat_ent = torch.cat([e for _, e in flat]) if with_entropy else None
        return _scatter_rows(flat_logp, flat_ent, n, T, (rows_cat, cols_cat))
    targets = mb.response_ids[rows_cat, cols_cat]
    flat_logits = torch.cat([x.to(logits[-1].dtype) for x in logits])
    flat_logp, flat_ent = _token_logprobs(flat_logits, targets, temperature, with_entropy)
    return _scatter_rows(flat_logp, flat_ent, n, T, (rows_cat, cols_cat))
