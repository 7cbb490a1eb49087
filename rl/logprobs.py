"""Per-token log-probs of responses under a causal LM, on padded, packed or shared_prompt
micro-batches: `response_logprobs`, and `SharedPrompts` (pass 1 of the shared_prompt layout).

Every layout returns the objective-facing tensors in the same shape: log-probs [n, T] with
each response right-aligned in the last columns, mask [n, T], so objectives never see the
layout. The micro-batches themselves (`MicroBatch`, `PackedMicroBatch`, `ResponseMicroBatch`,
`make_micro_batch`, `build_micro_batch`, ...) are built in rl/micro_batch.py; the chunked
lm_head + log-softmax autograd functions (`chunked_head_logprobs`, `chunked_logits_logprobs`,
the HEAD_BACKWARD / CHUNK_ELEMENTS / MIN_CHUNK switches) are in rl/chunked_head.py. Both are
re-exported here, and the switches can be read and set through this module as before.

padded: the model only needs logits for the last T + 1 positions (`logits_to_keep`), not the
prompts'. packed: `logits_to_keep` is the 1-D tensor of the K positions whose logits predict
a response token, so the lm_head and the log-softmax run on response tokens only; the K
log-probs are scattered (differentiably) into [n, T].

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
response token go through the head, in chunks (rl/chunked_head.py), from the decoder's hidden
states when the model's logits are a plain Linear head of them, else from the model's logits.
`response_logprobs(..., chunked=False)` or `USE_CHUNKED = False` runs the previous
full-logits path (A/B, tests).
"""

from __future__ import annotations

import sys
import types

import torch
from torch import Tensor

from rl import chunked_head
from rl.chunked_head import (PROFILE_TAG, _chunk, _compute_dtype, _HeadLogprobs,  # noqa: F401
                             _log_softmax_rows, _LogitsLogprobs, _probs_minus_onehot, _stats_rows,
                             chunked_head_logprobs, chunked_logits_logprobs)
from rl.micro_batch import (LAYOUTS, MicroBatch, PackedMicroBatch, ResponseMicroBatch,  # noqa: F401
                            _right_aligned_responses, _TokenCounts, build_micro_batch,
                            make_micro_batch, make_packed_micro_batch, make_response_micro_batch,
                            right_align)

USE_CHUNKED = True
"""Default path of `response_logprobs`: chunked head + log-softmax. False: full logits."""


def _forwarded(name: str) -> property:
    """An attribute of this module that is rl.chunked_head's `name` (read and set there)."""
    return property(lambda module: getattr(chunked_head, name),
                    lambda module, value: setattr(chunked_head, name, value))


class _Module(types.ModuleType):
    """rl.logprobs's module type. The chunked head's switches are read in rl.chunked_head;
    reading, setting or monkeypatching `rl.logprobs.HEAD_BACKWARD` (CHUNK_ELEMENTS,
    MIN_CHUNK) reads or sets rl.chunked_head's."""

    HEAD_BACKWARD = _forwarded("HEAD_BACKWARD")
    CHUNK_ELEMENTS = _forwarded("CHUNK_ELEMENTS")
    MIN_CHUNK = _forwarded("MIN_CHUNK")


sys.modules[__name__].__class__ = _Module


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
