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


def _token_logprobs(logits: Tensor, targets: Tensor, temperature: float,
                    with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """logits [..., V], targets [...] -> log-probs [...] (and entropies [...], no gradient)."""
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
                      with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs [n, T] of the response tokens (and entropies [n, T], no gradient).

    Logits are divided by `temperature` so the learner scores the distribution the rollout
    sampled from. Masked positions hold 0. Same result for every layout.
    """
    if isinstance(mb, PackedMicroBatch):
        return _packed_logprobs(model, mb, temperature, with_entropy)
    if isinstance(mb, ResponseMicroBatch):
        return _response_logprobs(model, mb, temperature, with_entropy)
    T = mb.response_ids.shape[1]
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                position_ids=mb.position_ids, logits_to_keep=T + 1, use_cache=False)
    # Logit column j predicts the token in column j + 1: the first T predict the response.
    logp, entropy = _token_logprobs(out.logits[:, :T], mb.response_ids, temperature, with_entropy)
    logp = logp.masked_fill(~mb.response_mask, 0.0)
    if entropy is not None:
        entropy = entropy.masked_fill(~mb.response_mask, 0.0)
    return logp, entropy


def _scatter_rows(flat_logp: Tensor, flat_ent: Tensor | None, n: int, T: int,
                  index: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """[K] values -> [n, T] at (rows, cols) = index, 0 elsewhere. index_put (not in place on a
    leaf) keeps the autograd path from [n, T] back to [K]."""
    logp = flat_logp.new_zeros(n, T).index_put(index, flat_logp)
    entropy = flat_ent.new_zeros(n, T).index_put(index, flat_ent) if flat_ent is not None else None
    return logp, entropy


def _packed_logprobs(model, mb: PackedMicroBatch, temperature: float,
                     with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    # use_cache=False matters: with a cache object transformers skips packed-sequence
    # detection and would let sequences attend to each other.
    out = model(input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=None,
                logits_to_keep=mb.logits_index, use_cache=False)
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
                       with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    shared = mb.shared
    n, T = mb.response_mask.shape
    lengths = mb.response_lengths
    # Token 0 of each response is predicted by its prompt's last position (pass 1).
    rows = torch.nonzero(lengths > 0).squeeze(1)                          # [n0]
    logits = [shared.first_logits.index_select(0, mb.prompt_rows[rows])]  # [n0, V]
    cols = [T - lengths[rows]]  # right-aligned column of token 0
    all_rows = [rows]
    if T > 1:
        prompt_mask = shared.prompt_mask.index_select(0, mb.prompt_rows)  # [n, P]
        position_ids = prompt_mask.sum(-1, keepdim=True) + torch.arange(T - 1, device=lengths.device)
        kwargs = dict(input_ids=mb.continuation_ids, position_ids=position_ids,
                      attention_mask=torch.cat([prompt_mask, mb.continuation_mask], dim=1),
                      past_key_values=shared.cache_for(mb.prompt_rows), use_cache=True)
        # Continuation position j of row i predicts token j + 1: real where j < len_i - 1,
        # which is exactly continuation_mask.
        r, j = torch.nonzero(mb.continuation_mask, as_tuple=True)  # [K]
        parts = _decoder_and_head(model)
        if parts is not None:  # the lm_head and log-softmax on real positions only
            hidden = parts[0](**kwargs).last_hidden_state  # [n, T - 1, H]
            logits.append(parts[1](hidden[r, j]))          # [K, V]
        else:
            logits.append(model(**kwargs).logits[r, j])
        all_rows.append(r)
        cols.append(T - lengths[r] + j + 1)
    rows_cat, cols_cat = torch.cat(all_rows), torch.cat(cols)
    targets = mb.response_ids[rows_cat, cols_cat]
    flat_logits = torch.cat([x.to(logits[-1].dtype) for x in logits])
    flat_logp, flat_ent = _token_logprobs(flat_logits, targets, temperature, with_entropy)
    return _scatter_rows(flat_logp, flat_ent, n, T, (rows_cat, cols_cat))
