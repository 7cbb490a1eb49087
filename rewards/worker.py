"""Worker processes: each loads every reward function by path and runs tasks sent over a pipe.

The parent never pickles a function object: it sends (name, path, kwargs, plan) once at start,
then tasks. A shared two-slot array `progress` = [position of the running call in its chunk,
its start time] lets the parent see which call is running and for how long, so it can kill a
hung worker exactly at the call's deadline and blame the right sample. A fresh worker replaces
a killed or crashed one.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from rewards.calling import IDLE, ChunkRunner
from rewards.loading import CallPlan, RewardError, import_callable

FunctionInfo = tuple[str, str, dict, CallPlan]  # (name, resolved path, kwargs, plan)


def worker_main(conn: Any, functions: list[FunctionInfo], sys_path: list[str],
                timeout_s: float, progress: Any) -> None:
    """Entry point of a worker process (module-level so forkserver/spawn can import it)."""
    # Ctrl-C goes to the whole process group; the parent decides how to shut down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # forkserver/spawn children do not see sys.path changes the parent made after start-up
    # (e.g. a test or launcher adding a folder): mirror the parent's path so imports match.
    sys.path[:] = list(sys_path) + [p for p in sys.path if p not in sys_path]
    runners = []
    try:
        for name, path, kwargs, plan in functions:
            fn, _ = import_callable(path, label=name)
            runners.append(ChunkRunner(fn, plan, kwargs, timeout_s, progress))
    except BaseException as exc:
        msg = str(exc) if isinstance(exc, RewardError) else f"{type(exc).__name__}: {exc}"
        conn.send(("load_error", f"in a reward worker process: {msg}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # parent went away
            return
        if msg is None:
            return
        task_id, fn_idx, n, pos, kw = msg
        outcomes, seconds = runners[fn_idx].run(n, pos, kw)
        conn.send((task_id, outcomes, seconds))


@dataclass
class Task:
    """A chunk of samples for one function. `indices` are positions in the step's batch."""

    fn_idx: int
    indices: list[int]
    step: int = 0
    id: int = 0
    sent_at: float = 0.0


@dataclass
class Worker:
    """Parent-side handle of one worker process."""

    proc: Any
    conn: Any
    progress: Any
    started_at: float
    ready: bool = False
    task: Task | None = None

    @classmethod
    def start(cls, ctx: Any, functions: list[FunctionInfo], timeout_s: float) -> "Worker":
        progress = ctx.RawArray("d", 2)
        progress[0] = IDLE
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        # daemon: an interpreter that exits without close() must not wait for its workers
        proc = ctx.Process(target=worker_main, name="reward-worker", daemon=True,
                           args=(child_conn, functions, list(sys.path), timeout_s, progress))
        proc.start()
        child_conn.close()
        return cls(proc, parent_conn, progress, time.monotonic())

    def running_call(self) -> tuple[float, float]:
        """(position in chunk, start time) of the running call; position IDLE when none."""
        # Position first: the worker stamps the start time before the position, so a new
        # position read here always comes with its own start time.
        position = self.progress[0]
        start = self.progress[1]
        return position, start

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        """Ask politely, then kill: close() must return even if a reward is stuck."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout=1.0)
        self.kill()


def default_context() -> Any:
    # forkserver: workers fork from a clean server process, not from the driver (whose Ray and
    # torch threads make a plain fork unsafe), and start faster than spawn. spawn elsewhere.
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method)


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
