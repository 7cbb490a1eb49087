"""The lm_head and log-softmax in chunks, forward and backward: log-probs (and entropies) of
chosen target tokens without a full [K, V] float32 logits tensor.

rl.logprobs passes only the K positions that predict a response token.
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
Linear, the first logits of the shared_prompt layout).

The switches HEAD_BACKWARD, CHUNK_ELEMENTS and MIN_CHUNK are read here; rl.logprobs forwards
reads and assignments of its same-named attributes to this module.
"""

from __future__ import annotations

import torch
from torch import Tensor


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

