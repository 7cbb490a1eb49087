"""RewardExecutor: score a step's completions with every reward function, in worker processes.

Processes, not threads: rule-based rewards (math-verify, regexes, sympy) are CPU-bound Python,
and math-verify's own timeouts use signal.alarm, which only works in a main thread. Each call
has a deadline (`timeout_s`); a worker whose call passes it is killed and replaced, so a hung
reward costs one timeout, never a stalled step. Every error, timeout and crash is counted in
the metrics and handled by `on_error`; none silently becomes a zero.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Any

from rewards.calling import ERROR, IDLE, OK, TIMEOUT, WHOLE_CHUNK, ChunkRunner, Outcome
from rewards.combine import RewardResult, combine
from rewards.loading import LoadedReward, RewardError
from rewards.worker import Task, Worker, default_context, describe_exit

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip_group", "value")
# Appended to a failure whose worker process exited inside the function (os._exit, a segfault
# in native code, the OOM killer); by then the executor has started a replacement.
EXITED = ("while scoring this sample: the reward function's process exited (os._exit, a crash in "
          "native code, or the OOM killer?) and was replaced by a new worker")


def _inputs(fn: LoadedReward, prompts: list[str], completions: list[str],
            columns: dict[str, list]) -> tuple[list[list], dict[str, list]]:
    """Per-sample input lists for one function: (positional inputs, keyword inputs).

    Only what the function takes is sent to the workers (completion token ids are large).
    """
    plan, n = fn.plan, len(completions)
    source: dict[str, list] = {"prompt": prompts, "prompts": prompts,
                               "completion": completions, "completions": completions,
                               "solution_str": completions}
    if plan.convention == "verl":
        # verl datasets keep the answer in reward_model.ground_truth; others in a column.
        if "ground_truth" in columns:
            truth = columns["ground_truth"]
        elif "reward_model" in columns and all(isinstance(r, dict) and "ground_truth" in r
                                               for r in columns["reward_model"]):
            truth = [r["ground_truth"] for r in columns["reward_model"]]
        elif "answer" in columns:
            truth = columns["answer"]
        else:
            raise RewardError(
                f"reward function {fn.name!r} (verl convention) needs a ground truth, but the batch "
                f"has columns {sorted(columns)}. Fix: provide a `ground_truth` column, a "
                "`reward_model` column of {'ground_truth': ...} dicts, or an `answer` column."
            )
        source["ground_truth"] = truth
        source["data_source"] = columns.get("data_source", ["unknown"] * n)
        source["extra_info"] = columns.get("extra_info", [None] * n)
    pos = [source[name] for name in plan.positional]
    kw = {name: source[name] for name in plan.keyword}
    if plan.convention != "verl":
        missing = [c for c in plan.required_columns if c not in columns]
        if missing:
            raise RewardError(
                f"reward function {fn.name!r} needs columns {missing}, but the batch has columns "
                f"{sorted(columns)}. Fix: add them to the dataset, give the parameters defaults, "
                "or pass constants in the function's `kwargs`."
            )
        wanted = columns if plan.var_kwargs else plan.column_params
        for c in wanted:
            if c in columns and c not in source and c not in fn.kwargs:
                kw[c] = columns[c]
    return pos, kw


class RewardExecutor:
    """Runs reward functions over a batch in `num_workers` processes (0: in this process, no
    timeouts or crash isolation: for debugging only)."""

    def __init__(self, functions: list[LoadedReward], timeout_s: float = 10.0, on_error: str = "raise",
                 error_value: float = 0.0, num_workers: int = 2, chunk_size: int | None = None,
                 startup_timeout_s: float = 120.0, mp_context: Any = None) -> None:
        if not functions:
            raise RewardError("RewardExecutor needs at least one reward function.")
        if on_error not in ON_ERROR:
            raise RewardError(f"reward.on_error={on_error!r} is unknown. Fix: use one of {list(ON_ERROR)}.")
        if not timeout_s > 0:
            raise RewardError(f"reward.timeout_s must be > 0, got {timeout_s!r}.")
        if num_workers < 0:
            raise RewardError(f"reward.workers must be >= 0, got {num_workers!r}.")
        if not math.isfinite(error_value):
            raise RewardError(f"reward.error_value must be finite, got {error_value!r}.")
        self.functions = list(functions)
        self.timeout_s, self.on_error, self.error_value = float(timeout_s), on_error, float(error_value)
        self.num_workers, self.chunk_size, self.startup_timeout_s = num_workers, chunk_size, startup_timeout_s
        self._info = [(f.name, f.path, f.kwargs, f.plan) for f in self.functions]
        self._ctx = mp_context or default_context()
        self._next_id = 0
        self._step = 0
        self.restarts = 0
        self._local = [ChunkRunner(f.fn, f.plan, f.kwargs, self.timeout_s) for f in self.functions]
        # Workers start now, in the background: their imports overlap the first rollout.
        self._workers = [self._start_worker() for _ in range(num_workers)]

    # ------------------------------------------------------------------ lifecycle
    def _start_worker(self) -> Worker:
        return Worker.start(self._ctx, self._info, self.timeout_s)

    def close(self) -> None:
        """Stop the worker processes (killing any that are stuck)."""
        for w in self._workers:
            w.stop()
        self._workers = []
        for r in self._local:
            r.close()

    def __enter__(self) -> "RewardExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ scoring
    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list] | None = None,
              group: list[int] | None = None) -> RewardResult:
        """Score N completions. columns: dataset columns, each a list of N values; group: [N]
        prompt-group id of each sample (used by on_error="skip_group")."""
        t0 = time.perf_counter()
        if self.num_workers and not self._workers:
            raise RewardError("this RewardExecutor is closed (or failed to start its workers); create a new one.")
        # A step interrupted mid-way (Ctrl-C, a raised RewardError) can leave tasks in flight;
        # the step number lets their late results be recognised and dropped.
        self._step += 1
        columns = dict(columns or {})
        n = len(completions)
        group = list(range(n)) if group is None else list(group)
        for label, values in [("prompts", prompts), ("group", group), *columns.items()]:
            if len(values) != n:
                raise RewardError(f"reward inputs disagree in length: {n} completions but {len(values)} "
                                  f"{label!r}. Fix: pass one value per completion.")
        self._payload = [_inputs(f, prompts, completions, columns) for f in self.functions]
        self._outcomes: list[list[Outcome | None]] = [[None] * n for _ in self.functions]
        self._seconds = [0.0] * len(self.functions)
        self._abort: RewardError | None = None
        restarts_before = self.restarts
        self._replace_dead_idle()
        tasks = self._make_tasks(n)
        if self.num_workers == 0:
            for task in tasks:
                if self._abort is not None:
                    break
                self._record(task, *self._local[task.fn_idx].run(len(task.indices), *self._slice(task)))
        elif n:
            self._run_pool(tasks)
        if self._abort is not None:
            raise self._abort
        result = combine(self.functions, self._outcomes, group, self.on_error, self.error_value)
        for f, secs in zip(self.functions, self._seconds):
            result.metrics[f"reward/{f.name}/seconds"] = secs
        result.metrics["reward/seconds"] = time.perf_counter() - t0
        result.metrics["reward/worker_restarts"] = float(self.restarts - restarts_before)
        if result.failures:
            log.warning("%d reward failures this step (on_error=%s); first: %s",
                        len(result.failures), self.on_error, result.failures[0])
        return result

    def _make_tasks(self, n: int) -> deque[Task]:
        tasks: deque[Task] = deque()
        workers = max(1, self.num_workers)
        for fn_idx, f in enumerate(self.functions):
            if self.chunk_size:
                size = self.chunk_size
            elif f.plan.batched:
                size = math.ceil(n / workers)  # one call per worker: batch functions amortize setup
            else:
                # ~4 chunks per worker balance uneven per-sample costs; 64 caps the work redone
                # when a worker is killed mid-chunk.
                size = min(64, max(1, math.ceil(n / (4 * workers))))
            for a in range(0, n, max(1, size)):
                tasks.append(Task(fn_idx, list(range(a, min(n, a + size))), step=self._step))
        return tasks

    def _slice(self, task: Task) -> tuple[list[list], dict[str, list]]:
        pos, kw = self._payload[task.fn_idx]
        idx = task.indices
        if idx == list(range(idx[0], idx[-1] + 1)):
            a, b = idx[0], idx[-1] + 1
            return [p[a:b] for p in pos], {k: v[a:b] for k, v in kw.items()}
        return [[p[j] for j in idx] for p in pos], {k: [v[j] for j in idx] for k, v in kw.items()}

    def _record(self, task: Task, outcomes: list[Outcome], seconds: float) -> None:
        if task.step != self._step:
            return  # left over from an interrupted step
        self._seconds[task.fn_idx] += seconds
        row = self._outcomes[task.fn_idx]
        for j, outcome in zip(task.indices, outcomes):
            row[j] = outcome
            if outcome[0] != OK and self.on_error == "raise" and self._abort is None:
                kind = "timed out" if outcome[0] == TIMEOUT else "failed"
                self._abort = RewardError(
                    f"reward function {self.functions[task.fn_idx].name!r} {kind} on sample {j}: "
                    f"{outcome[1]}. Fix: correct the function, or set reward.on_error to 'skip_group' "
                    "or 'value' to train past failing samples (they are counted in the metrics)."
                )

    # ------------------------------------------------------------------ process pool
    def _run_pool(self, tasks: deque[Task]) -> None:
        while True:
            if self._abort is not None:
                tasks.clear()  # stop early; let in-flight tasks finish so workers stay in sync
            for w in self._workers:
                if w.ready and w.task is None and tasks:
                    self._send(w, tasks.popleft())
            busy = [w for w in self._workers if w.task is not None]
            if not tasks and not busy:
                return
            timeout = self._next_deadline() - time.monotonic()
            objs = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
            ready = set(wait(objs, timeout=max(0.0, timeout)))
            for w in list(self._workers):
                if w.conn in ready or w.proc.sentinel in ready:
                    self._service(w, tasks)
            now = time.monotonic()
            for w in list(self._workers):
                self._check_deadline(w, tasks, now)

    def _send(self, w: Worker, task: Task) -> None:
        self._next_id += 1
        task.id, task.sent_at = self._next_id, time.monotonic()
        pos, kw = self._slice(task)
        w.task = task
        try:
            w.conn.send((task.id, task.fn_idx, len(task.indices), pos, kw))
        except (BrokenPipeError, ConnectionResetError, EOFError):
            # The process died after its last check; its sentinel wakes _run_pool, which
            # replaces it and redoes this chunk (nothing of it ran, so nothing is blamed).
            if w.proc.is_alive():
                w.proc.kill()

    def _replace_dead_idle(self) -> None:
        """Replace workers that died while no task was theirs (between steps: the OOM killer, a
        thread or child process the reward function left behind): sending them the next task
        would fail. Nothing is blamed; the restart is counted."""
        for w in list(self._workers):
            if w.task is None and w.ready and not w.proc.is_alive():
                w.proc.join()
                log.warning("a reward worker process exited between calls (%s); starting a new one",
                            describe_exit(w.proc.exitcode))
                self._replace(w, deque(), "crash", "exited between calls")

    def _limit(self, w: Worker, position: float) -> float:
        # Async calls time out softly inside the worker (asyncio.wait_for); the hard kill only
        # backs that up, after a grace period, for a coroutine that blocks its event loop.
        async_chunk = position == WHOLE_CHUNK and self.functions[w.task.fn_idx].plan.is_async
        return self.timeout_s + (max(1.0, 0.5 * self.timeout_s) if async_chunk else 0.0)

    @staticmethod
    def _running_call(w: Worker) -> tuple[float, float]:
        position, start = w.running_call()
        # A start time older than the task means the worker has not yet begun it (it stamps
        # the start before the position): never count idle time between steps against a call.
        return position, max(start, w.task.sent_at if w.task else start)

    def _next_deadline(self) -> float:
        deadlines = []
        for w in self._workers:
            if not w.ready:
                deadlines.append(w.started_at + self.startup_timeout_s)
            elif w.task is not None:
                position, start = self._running_call(w)
                # The worker may not have started the call yet: check again shortly.
                deadlines.append(start + self._limit(w, position) if position != IDLE else time.monotonic() + 0.05)
        return min(deadlines, default=time.monotonic() + 1.0)

    def _drain(self, w: Worker) -> None:
        try:
            while w.conn.poll():
                self._handle(w, w.conn.recv())
        except (EOFError, OSError):
            pass  # the process is gone; _service/_check_deadline deal with it

    def _service(self, w: Worker, tasks: deque[Task]) -> None:
        """Handle messages from w; if its process has died, attribute and replace it."""
        self._drain(w)
        if w in self._workers and not w.proc.is_alive():
            w.proc.join()
            self._replace(w, tasks, "crash", f"worker process died ({describe_exit(w.proc.exitcode)})")

    def _handle(self, w: Worker, msg: tuple) -> None:
        if msg[0] == "ready":
            w.ready = True
        elif msg[0] == "load_error":
            self.close()
            raise RewardError(msg[1])
        elif w.task is not None and msg[0] == w.task.id:
            task, w.task = w.task, None
            self._record(task, msg[1], msg[2])

    def _check_deadline(self, w: Worker, tasks: deque[Task], now: float) -> None:
        if not w.ready:
            if now > w.started_at + self.startup_timeout_s:
                self.close()
                raise RewardError(f"a reward worker process did not start within {self.startup_timeout_s:g} s "
                                  "(a reward module that hangs on import?). Fix: check the module's import.")
            return
        if w.task is None:
            return
        position, start = self._running_call(w)
        if position == IDLE or now < start + self._limit(w, position):
            return
        w.kill()
        self._drain(w)  # a result sent just before the kill still counts
        self._replace(w, tasks, "timeout", f"timed out after {self.timeout_s:g} s")

    def _replace(self, w: Worker, tasks: deque[Task], kind: str, message: str) -> None:
        """w's process is gone: blame the call it was running, requeue the rest, start a new one."""
        if w not in self._workers:
            return
        if not w.ready:
            self.close()
            raise RewardError(f"a reward worker process exited during start-up: {message}. Fix: check that "
                              "the reward modules import cleanly in a fresh Python process.")
        self._workers.remove(w)
        w.kill()
        self.restarts += 1
        task = w.task
        if task is not None:
            position = int(w.progress[0])
            status = TIMEOUT if kind == "timeout" else ERROR
            if kind == "crash":
                message += " " + EXITED
            if position == int(WHOLE_CHUNK):
                blamed = list(task.indices)  # a batch call or async chunk: the whole chunk failed
            elif 0 <= position < len(task.indices):
                blamed = [task.indices[position]]
            else:
                blamed = []  # between calls: nothing to blame, redo the chunk
            if blamed:
                b = set(blamed)
                self._record(Task(task.fn_idx, blamed, step=task.step), [(status, message, None)] * len(blamed),
                             time.monotonic() - task.sent_at)
                rest = [j for j in task.indices if j not in b]
            else:
                rest = task.indices
            if rest and task.step == self._step:
                # Results of calls finished before the kill were lost with the process: redo them.
                tasks.appendleft(Task(task.fn_idx, rest, step=task.step))
        self._workers.append(self._start_worker())
