"""Run one reward function over one chunk of samples and turn what it returns into outcomes.

This is the code a worker process runs for a task; the executor's in-process mode
(`num_workers=0`) runs it too. It never raises for a bad sample: each sample gets an outcome
`(status, value, sub_scores)`, where status is OK (value: float | None), ERROR or TIMEOUT
(value: a message). Validating return values here, in the worker, means an unpicklable
return value is reported with its repr instead of breaking the pipe.
"""

from __future__ import annotations

import asyncio
import math
import numbers
import time
import traceback
from typing import Any, Callable, Sequence

from rewards.loading import PROMPT_MESSAGES, CallPlan

OK, ERROR, TIMEOUT = 0, 1, 2
Outcome = tuple[int, Any, "dict[str, float] | None"]

# progress[0] values besides a sample's position in the chunk
IDLE = -1.0
WHOLE_CHUNK = -2.0


class BadReturn(Exception):
    """A reward function returned something that is not a reward."""


def _short_repr(value: Any, limit: int = 200) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not hide the real problem
        text = f"<{type(value).__name__} with failing repr: {exc}>"
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


def _as_float(value: Any) -> float | None:
    """float for real numbers (incl. bool, numpy scalars, 0-d tensors), else None."""
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        try:
            inner = item()
        except Exception:
            return None
        if isinstance(inner, numbers.Real):
            return float(inner)
    return None


def normalize(value: Any) -> tuple[float | None, dict[str, float] | None]:
    """Reward value -> (score or None, numeric sub-scores or None); BadReturn otherwise.

    Accepted: a real number, None (not applicable), or a dict with a numeric "score" (verl);
    the dict's other numeric entries become sub-scores, non-numeric ones (e.g. verl's "pred"
    strings) are ignored. NaN and inf are errors: they would poison the advantages.
    """
    if value is None:
        return None, None
    subs = None
    score = value
    if isinstance(value, dict):
        if "score" not in value:
            raise BadReturn(f"returned a dict without a 'score' key: {_short_repr(value)}")
        score = value["score"]
        subs = {}
        for key, sub in value.items():
            if key != "score":
                f = _as_float(sub)
                if f is not None and math.isfinite(f):
                    subs[str(key)] = f
    f = _as_float(score)
    if f is None:
        raise BadReturn(
            f"returned {_short_repr(value)} (type {type(value).__name__}); expected a number, None, "
            "or a dict with a numeric 'score'"
        )
    if not math.isfinite(f):
        raise BadReturn(f"returned a non-finite reward {_short_repr(value)}")
    return f, subs


def describe_exception(exc: BaseException) -> str:
    """`Type: message (at file:line in func)`: the original message plus where it was raised."""
    where = ""
    tb = traceback.extract_tb(exc.__traceback__)
    if tb:
        last = tb[-1]
        where = f" (at {last.filename}:{last.lineno} in {last.name})"
    return f"{type(exc).__name__}: {exc}{where}"


def conversational_inputs(plan: CallPlan, pos: Sequence[list], kw: dict[str, list]) -> tuple[list[list], dict[str, list]]:
    """Consume the PROMPT_MESSAGES column; for the TRL convention, turn each conversational
    sample's inputs into what TRL's GRPOTrainer passes: `prompts[i]` the prompt's messages,
    `completions[i]` ``[{"role": "assistant", "content": text}]``. Samples whose entry is None
    (prompt used as plain text) keep their strings, as TRL's standard format does."""
    if PROMPT_MESSAGES not in kw:
        return list(pos), kw
    kw = dict(kw)
    messages = kw.pop(PROMPT_MESSAGES)
    if plan.convention != "trl" or not any(isinstance(m, list) for m in messages):
        return list(pos), kw

    def convert(name: str, values: list) -> list:
        if name == "prompts":
            return [list(m) if isinstance(m, list) else v for v, m in zip(values, messages)]
        if name == "completions":
            return [[{"role": "assistant", "content": v}] if isinstance(m, list) else v
                    for v, m in zip(values, messages)]
        return values

    return ([convert(name, v) for name, v in zip(plan.positional, pos)],
            {name: convert(name, v) for name, v in kw.items()})


def _call_args(plan: CallPlan, pos: Sequence[list], kw: dict[str, list], i: int | None,
               kwargs: dict[str, Any]) -> tuple[list, dict[str, Any]]:
    # i None: batched call, whole lists; else the i-th element of every input.
    if i is None:
        args = list(pos)
        call_kw = dict(kw)
    else:
        args = [p[i] for p in pos]
        call_kw = {k: v[i] for k, v in kw.items()}
    call_kw.update(kwargs)  # config kwargs win over same-named columns
    return args, call_kw


class ChunkRunner:
    """Calls one loaded function on chunks; owns the event loop for async functions."""

    def __init__(self, fn: Callable[..., Any], plan: CallPlan, kwargs: dict[str, Any],
                 timeout_s: float, progress: Any | None = None) -> None:
        self.fn, self.plan, self.kwargs, self.timeout_s = fn, plan, kwargs, timeout_s
        # progress: shared [position in chunk, start time]; the parent reads it to kill a
        # worker whose current call is past its deadline and to know which sample hung.
        self.progress = progress
        self._loop: asyncio.AbstractEventLoop | None = None

    def _mark(self, position: float) -> None:
        if self.progress is not None:
            self.progress[1] = time.monotonic()  # start first: the parent never sees a new index with a stale start
            self.progress[0] = position

    def _run_async(self, coro: Any) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def run(self, n: int, pos: Sequence[list], kw: dict[str, list]) -> tuple[list[Outcome], float]:
        """Score n samples; returns one outcome per sample and the seconds spent in the function."""
        t0 = time.perf_counter()
        pos, kw = conversational_inputs(self.plan, pos, kw)
        try:
            if self.plan.batched:
                outcomes = self._run_batched(n, pos, kw)
            elif self.plan.is_async:
                outcomes = self._run_async(self._async_samples(n, pos, kw))
            else:
                outcomes = self._run_samples(n, pos, kw)
        finally:
            self._mark(IDLE)
        return outcomes, time.perf_counter() - t0

    def _run_samples(self, n: int, pos: Sequence[list], kw: dict[str, list]) -> list[Outcome]:
        out: list[Outcome] = []
        for i in range(n):
            self._mark(i)
            args, call_kw = _call_args(self.plan, pos, kw, i, self.kwargs)
            try:
                score, subs = normalize(self.fn(*args, **call_kw))
                out.append((OK, score, subs))
            except BadReturn as exc:
                out.append((ERROR, str(exc), None))
            except Exception as exc:
                out.append((ERROR, describe_exception(exc), None))
        return out

    async def _one_async(self, args: list, call_kw: dict[str, Any]) -> Outcome:
        try:
            value = await asyncio.wait_for(self.fn(*args, **call_kw), self.timeout_s)
            score, subs = normalize(value)
            return (OK, score, subs)
        except asyncio.TimeoutError:
            return (TIMEOUT, f"timed out after {self.timeout_s:g} s", None)
        except BadReturn as exc:
            return (ERROR, str(exc), None)
        except Exception as exc:
            return (ERROR, describe_exception(exc), None)

    async def _async_samples(self, n: int, pos: Sequence[list], kw: dict[str, list]) -> list[Outcome]:
        # Async rewards are usually I/O bound (a judge model behind an API): run the chunk
        # concurrently, each call under its own timeout.
        self._mark(WHOLE_CHUNK)
        calls = [self._one_async(*_call_args(self.plan, pos, kw, i, self.kwargs)) for i in range(n)]
        return list(await asyncio.gather(*calls))

    def _run_batched(self, n: int, pos: Sequence[list], kw: dict[str, list]) -> list[Outcome]:
        self._mark(WHOLE_CHUNK)
        args, call_kw = _call_args(self.plan, pos, kw, None, self.kwargs)
        try:
            if self.plan.is_async:
                try:
                    raw = self._run_async(asyncio.wait_for(self.fn(*args, **call_kw), self.timeout_s))
                except asyncio.TimeoutError:
                    return [(TIMEOUT, f"timed out after {self.timeout_s:g} s", None)] * n
            else:
                raw = self.fn(*args, **call_kw)
        except Exception as exc:
            return [(ERROR, describe_exception(exc), None)] * n
        # Any sized sequence of per-sample values (list, tuple, numpy array, 1-d tensor).
        sized = hasattr(raw, "__len__") and not isinstance(raw, (str, bytes, dict))
        values = list(raw) if sized else None
        if values is None or len(values) != n:
            msg = (f"returned {_short_repr(raw)} for a chunk of {n} samples; expected a list of "
                   f"{n} numbers or None (one per completion)")
            return [(ERROR, msg, None)] * n
        out: list[Outcome] = []
        for value in values:
            try:
                score, subs = normalize(value)
                out.append((OK, score, subs))
            except BadReturn as exc:
                out.append((ERROR, str(exc), None))
        return out

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None
