"""Checkpoint directories that are either complete or absent.

A checkpoint `<output_dir>/checkpoints/step_N` is written in a hidden sibling
`.step_N.tmp` (learner rank 0: HF weights, tokenizer, optimizer.pt; then the driver:
trainer_state.json), sealed with a `COMPLETE` file and only then renamed to `step_N`. A rename
of a directory within one filesystem is atomic, so a crash at any moment of a save leaves
either the old set of checkpoints or the new one, never a `step_N` that is half written.
Leftover `.step_*.tmp` directories are ignored by readers and removed by the next `begin`.

    tmp = begin(output_dir, step)          # fresh .step_N.tmp
    ... writers fill tmp ...
    commit(tmp, checkpoint_path(output_dir, step))

Readers: `newest_complete_checkpoint(output_dir)` (trainer.resume_from: auto) and
`check_checkpoint(path)` (an explicit trainer.resume_from).

A reader counts a `step_N` as complete when its weights, config.json, optimizer.pt and a
trainer_state.json that parses are there. That also accepts checkpoints written before this
module existed (no `COMPLETE` file; the old save wrote trainer_state.json last, after the
learner had returned), so `trainer.resume_from: auto` continues old runs too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

COMPLETE_FILE = "COMPLETE"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
REQUIRED_FILES = ("config.json", OPTIMIZER_FILE, STATE_FILE)
"""Files a complete checkpoint holds besides its weights (model*.safetensors)."""

_STEP_DIR = re.compile(r"step_(\d+)")
_LEFTOVER = re.compile(r"\.step_\d+\.(tmp|old)")


class IncompleteCheckpoint(ValueError):
    """A directory that is not a complete checkpoint; the message says what is missing."""


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """Where step `step`'s checkpoint lives once complete: <output_dir>/checkpoints/step_<step>."""
    return checkpoints_dir(output_dir) / f"step_{int(step)}"


def _tmp_path(output_dir: str | os.PathLike, step: int) -> Path:
    return checkpoints_dir(output_dir) / f".step_{int(step)}.tmp"


def begin(output_dir: str | os.PathLike, step: int) -> Path:
    """An empty `.step_N.tmp` for step N's files. Removes leftovers of earlier interrupted
    saves (every `.step_*.tmp` and `.step_*.old`): one driver writes an output_dir at a time."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if _LEFTOVER.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
    tmp = _tmp_path(output_dir, step)
    tmp.mkdir()
    return tmp


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file under `path` (and the directories) to disk, so a power loss after the
    rename cannot leave a complete-looking checkpoint with empty files. Called by the writers on
    their own node (learner rank 0 for its files, the driver for its own)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename still is atomic
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> Path:
    """Seal `tmp_dir` (every required file present, trainer_state.json valid) with COMPLETE and
    rename it to `final_dir`. An existing `final_dir` (the same step saved again after resuming
    from an earlier checkpoint) is moved aside first and removed after the rename; a crash in
    between leaves no `final_dir` at all, never a mixed one. IncompleteCheckpoint if a file is
    missing: nothing is renamed then."""
    tmp, final = Path(tmp_dir), Path(final_dir)
    missing = _missing_files(tmp)
    if missing:
        raise IncompleteCheckpoint(f"{tmp} lacks {', '.join(missing)}; not committing it as {final.name}.")
    state = _read_state(tmp)  # raises IncompleteCheckpoint when it does not parse
    if _STEP_DIR.fullmatch(final.name) and int(state["step"]) != int(final.name[5:]):
        raise IncompleteCheckpoint(f"{tmp / STATE_FILE} says step {state['step']}, but it is committed as {final.name}.")
    _fsync_file(tmp / STATE_FILE)
    marker = tmp / COMPLETE_FILE
    marker.write_text(json.dumps({"step": int(state["step"])}) + "\n")
    _fsync_file(marker)
    _fsync_dir(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _missing_files(path: Path) -> list[str]:
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        missing.append("model weights (*.safetensors)")
    return missing


def _read_state(path: Path) -> dict:
    try:
        state = json.loads((path / STATE_FILE).read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IncompleteCheckpoint(f"{path / STATE_FILE} is not a valid training state ({type(e).__name__}: {e}).") from None
    return state


def check_checkpoint(path: str | os.PathLike) -> dict:
    """The training state of a complete checkpoint; IncompleteCheckpoint (what is missing) else.

    Complete: the weights and every required file present, and a trainer_state.json that
    parses. A checkpoint written through `commit` also has its `COMPLETE` marker (it only ever
    appears under its final name complete); one written before this module has no marker and
    is judged by its files alone (the old save wrote trainer_state.json last).
    """
    p = Path(path)
    if not p.is_dir():
        raise IncompleteCheckpoint(f"{p} is not a directory.")
    if _LEFTOVER.fullmatch(p.name):
        raise IncompleteCheckpoint(f"{p} is the leftover of an interrupted save.")
    missing = _missing_files(p)
    if missing:
        raise IncompleteCheckpoint(f"{p} lacks {', '.join(missing)} (a save that was interrupted?).")
    return _read_state(p)


def is_complete(path: str | os.PathLike) -> bool:
    try:
        check_checkpoint(path)
    except IncompleteCheckpoint:
        return False
    return True


def complete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under <output_dir>/checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_DIR.fullmatch(entry.name)
        if m and is_complete(entry):
            found.append((int(m.group(1)), entry))
    return sorted(found)


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint of the highest step in <output_dir>/checkpoints, or None.
    Half-written `.step_N.tmp` leftovers and step_N directories that fail the check are skipped."""
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume_from: str | None, output_dir: str | os.PathLike) -> tuple[str | None, str | None]:
    """trainer.resume_from -> (the checkpoint directory to resume from or None, a line to log).

    null: (None, None), a fresh run. `auto`: the newest complete checkpoint in
    <output_dir>/checkpoints, or None (fresh) when there is none. A path: it must be a complete
    checkpoint, else ConfigError naming the field, the value and the fix.
    """
    from rl.errors import ConfigError

    if resume_from is None or str(resume_from).strip() == "":
        return None, None
    if str(resume_from).strip() == "auto":
        newest = newest_complete_checkpoint(output_dir)
        if newest is None:
            return None, (f"trainer.resume_from=auto: no complete checkpoint in {checkpoints_dir(output_dir)}; "
                          f"starting from step 0")
        return str(newest), f"trainer.resume_from=auto: resuming from {newest}"
    path = Path(os.path.expanduser(str(resume_from)))
    try:
        check_checkpoint(path)
    except IncompleteCheckpoint as e:
        what = "does not exist" if not path.exists() else f"is not a complete checkpoint: {e}"
        # Name a checkpoint that would work: the newest complete one next to the path given, or
        # in this run's output_dir.
        near = newest_complete_checkpoint(path.parent.parent) if _STEP_DIR.fullmatch(path.name) else None
        near = near or newest_complete_checkpoint(output_dir)
        hint = f" (the newest complete one there is {near})" if near else ""
        raise ConfigError(
            f"trainer.resume_from = {str(resume_from)!r} {what.rstrip('.')}. Fix: point it at a complete "
            f"checkpoint directory, …/checkpoints/step_N{hint}, or set trainer.resume_from=auto to continue "
            f"from the newest complete checkpoint in trainer.output_dir (a fresh start when there is none)."
        ) from None
    return str(path), f"trainer.resume_from: resuming from {path}"
