"""Stopping a run on SIGTERM (preemption, `kill`) or SIGINT (Ctrl-C) without losing a step.

The first signal only sets a flag (`STOP`); the trainer looks at it between steps
(`at_step_end`, called by `Trainer.fit` after each completed step), checkpoints the step it
just finished (unless that step was saved already) and raises `Preempted`. `rl.train.main`
then shuts the actors and Ray down, prints the command that resumes the run and exits with
128 + the signal number (130 for SIGINT, 143 for SIGTERM).

- A signal outside the step loop (preflight, actors starting) raises `Preempted` at once:
  there is no completed step to save. Raised while the main thread waits in `ray.get`, it
  comes out as Ray's SystemError caused by it: callers look for it with `find_preempted`.
- If the running step has not finished `grace_s` seconds after the signal (RL_STOP_GRACE_S,
  default 40), it is abandoned: `Preempted` is raised inside it and the newest checkpoint
  already on disk is what a resume uses. This keeps the whole stop within a 60 s preemption
  notice when steps are long.
- A second signal while stopping exits at once (os._exit): Ray's own processes die with the
  driver (Ray starts them fate-sharing), reward workers see their pipe close.

Handlers are installed by `handle_signals()` (a context manager that restores the previous
handlers on exit, so `rl.train.run` called from a test or a benchmark leaves the caller's
handlers as they were). `ray.init` would put its own SIGTERM handler in place:
`keep_handlers_through_ray_init()` stops it, and `install_signal_handlers()` after it puts
ours back in case a Ray version does it another way.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import signal
import sys
import threading
import time
import _thread

SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFAULT_GRACE_S = 40.0


class Preempted(Exception):
    """The run stopped on a signal. step: the last completed step (None: stopped before one
    finished); checkpoint: the checkpoint saved for it, or None."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: str | None = None,
                 abandoned_step: bool = False):
        self.signum, self.step, self.checkpoint, self.abandoned_step = signum, step, checkpoint, abandoned_step
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class StopRequest:
    """Whether (and by which signal) the run was asked to stop, and where it may stop.

    `deferring` is True inside the step loop: the signal waits for the end of the step.
    """

    def __init__(self, grace_s: float | None = None):
        self.signum: int | None = None
        self.at: float | None = None
        self.deferring = False
        self.expired = False  # the grace period ran out before the step ended
        self.grace_s = float(os.environ.get("RL_STOP_GRACE_S", DEFAULT_GRACE_S)) if grace_s is None else grace_s
        self._safe = threading.Event()
        self.swallowed: Preempted | None = None  # raised where Python ignores exceptions: raise again

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def reset(self) -> None:
        self.__init__()

    @contextlib.contextmanager
    def deferred(self):
        """Inside: a signal is served at the next step end (`at_step_end`), not at once."""
        self.deferring = True
        try:
            if self.requested:  # arrived just before the loop started: nothing completed yet
                raise Preempted(self.signum)
            yield self
        finally:
            self.deferring = False
            self._safe.set()  # no watchdog outlives the loop

    def reached_safe_point(self) -> None:
        """The step finished: the watchdog stands down while its checkpoint is written."""
        self._safe.set()

    def _watchdog(self) -> None:
        if self._safe.wait(self.grace_s):
            return
        self.expired = True
        _thread.interrupt_main(self.signum)  # runs _handler in the main thread, which raises


STOP = StopRequest()


def _say(text: str) -> None:
    """Write to stderr from a signal handler: os.write, never print (a handler that runs while
    the main thread is inside a write to sys.stderr, e.g. tqdm's bar, would hit a reentrant
    call of the same buffered writer)."""
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


def _handler(signum, frame) -> None:
    stop = STOP
    name = signal.Signals(signum).name
    if stop.swallowed is not None:  # _redeliver's interrupt: raise it again, now in ordinary code
        if _inside_redeliver(frame):  # an exception here would be dropped for good: try again later
            _interrupt_soon(stop.swallowed.signum)
            return
        lost, stop.swallowed = stop.swallowed, None
        raise lost
    if stop.requested and stop.expired:  # the watchdog's interrupt (interrupt_main)
        stop.expired = False  # once; a further signal is a second signal
        if stop._safe.is_set():
            return  # the step ended meanwhile: at_step_end serves the request
        stop._safe.set()
        _say(f"\nThe running step did not finish within {stop.grace_s:g} s of {signal.Signals(stop.signum).name}: "
             f"abandoning it (the newest checkpoint on disk is kept); shutting down.")
        raise Preempted(stop.signum, abandoned_step=True)
    if stop.requested:
        _say(f"\n{name} again: exiting now, without a checkpoint of the running step.")
        os._exit(128 + signum)
    stop.signum, stop.at = signum, time.monotonic()
    if not stop.deferring:
        _say(f"\n{name}: stopping (no training step has completed in this run yet).")
        raise Preempted(signum)
    _say(f"\n{name}: finishing the running step, then checkpointing it and shutting down "
         f"(at most {stop.grace_s:g} s for the step; {name} again exits at once).")
    stop._safe.clear()
    threading.Thread(target=stop._watchdog, name="stop-watchdog", daemon=True).start()


def _redeliver(unraisable, fallback=sys.unraisablehook) -> None:
    """sys.unraisablehook while our handlers are in place.

    Python runs a signal handler between any two bytecodes of the main thread, also inside a
    weakref callback, a __del__ or logging's lock release; an exception raised there is printed
    as "Exception ignored in ..." and dropped. A Preempted dropped that way is raised again at
    the next bytecode (interrupt_main runs _handler, which raises it), without the traceback.
    Anything else goes to the previous hook."""
    if isinstance(unraisable.exc_value, Preempted) and STOP.requested:
        STOP.swallowed = unraisable.exc_value
        _interrupt_soon(unraisable.exc_value.signum)  # not now: it would land in this hook
        return
    fallback(unraisable)


def _interrupt_soon(signum: int) -> None:
    """Run _handler in the main thread a moment from now (from a timer thread)."""
    timer = threading.Timer(0.005, _thread.interrupt_main, args=(signum,))
    timer.daemon = True
    timer.start()


def _inside_redeliver(frame) -> bool:
    while frame is not None:
        if frame.f_code is _redeliver.__code__:
            return True
        frame = frame.f_back
    return False


def install_signal_handlers() -> None:
    """Our handler for SIGINT and SIGTERM (main thread only; elsewhere nothing happens)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in SIGNALS:
        signal.signal(s, _handler)


@contextlib.contextmanager
def keep_handlers_through_ray_init():
    """While `ray.init` runs, ours stay the SIGTERM handler. ray.init installs its own twice
    (sys.exit(15) in the driver; kill the node's processes and exit 1), through
    ray._private.utils.set_sigterm_handler; a SIGTERM in that window (seconds: it starts the
    GCS and the raylet) would exit 15 without a word. Without that function (another Ray
    version) nothing is patched, and install_signal_handlers() after ray.init still applies."""
    try:
        from ray._private import utils as ray_utils
    except ImportError:
        yield
        return
    original = getattr(ray_utils, "set_sigterm_handler", None)
    if original is None:
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original


@contextlib.contextmanager
def handle_signals():
    """Install the handlers for the duration; restore the previous ones after."""
    if threading.current_thread() is not threading.main_thread():
        yield STOP
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    previous_hook = sys.unraisablehook
    STOP.reset()
    install_signal_handlers()
    sys.unraisablehook = functools.partial(_redeliver, fallback=previous_hook)
    try:
        yield STOP
    finally:
        sys.unraisablehook = previous_hook
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def at_step_end(trainer, step: int) -> None:
    """Trainer.fit calls this after each completed step: on a stop request, checkpoint `step`
    (unless the step already saved one) and raise Preempted."""
    stop = STOP
    if not stop.requested:
        return
    stop.reached_safe_point()
    if getattr(trainer, "last_saved_step", None) == step:
        path = trainer.out / "checkpoints" / f"step_{step}"
    else:
        from tqdm import tqdm

        t0 = time.perf_counter()
        path = trainer.save_checkpoint(step)
        tqdm.write(f"checkpoint of step {step} written in {time.perf_counter() - t0:.1f} s")
    raise Preempted(stop.signum, step=step, checkpoint=str(path))


def find_preempted(exc: BaseException | None) -> Preempted | None:
    """The Preempted in `exc`'s chain of causes, or None. A handler's exception raised while
    the main thread waits in ray.get reaches the caller as Ray's SystemError, caused by it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Preempted):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def resume_command(argv: list[str]) -> str:
    """`python -m rl.train <the same arguments> trainer.resume_from=auto` (an earlier
    trainer.resume_from override is dropped: auto finds the newest checkpoint)."""
    args = [a for a in argv if not a.startswith("trainer.resume_from=")]
    return shlex.join(["python", "-m", "rl.train", *args, "trainer.resume_from=auto"])


def report(e: Preempted, argv: list[str], newest_checkpoint: str | None, total_steps: int | None = None) -> str:
    """The lines printed when the run stops on a signal."""
    name = signal.Signals(e.signum).name
    if e.step is not None:
        of = f" of {total_steps}" if total_steps else ""
        head = f"Stopped by {name} after step {e.step}{of}; checkpoint: {e.checkpoint}"
    elif newest_checkpoint:
        why = "the running step was abandoned" if e.abandoned_step else "outside the step loop"
        head = f"Stopped by {name} ({why}); newest complete checkpoint: {newest_checkpoint}"
    else:
        head = f"Stopped by {name} before any checkpoint was written; a resumed run starts from step 0"
    return f"{head}.\nResume with:\n  {resume_command(argv)}"
