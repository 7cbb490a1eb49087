"""Atomic checkpoints (rl/checkpoints.py): a save interrupted at any stage never leaves a
checkpoint that looks complete, readers skip leftovers, the next save cleans them, and
trainer.resume_from (a path or auto) is resolved or refused with the field, value and fix.
No Ray: the save's stages are replayed with small files, and once with a real Learner."""

from __future__ import annotations

import json
import os

import pytest

from rl import checkpoints as ck
from rl.errors import ConfigError

STAGES = ("begin", "weights_partial", "weights", "tokenizer", "optimizer", "state_partial", "state")


class Crash(Exception):
    """The driver or learner died here."""


def _save(out, step, crash_at=None):
    """What Trainer.save_checkpoint does, in its order (learner rank 0's files, then the driver's
    trainer_state.json, then commit), with a crash possible after any stage."""

    def stage(name):
        if name == crash_at:
            raise Crash(name)

    tmp = ck.begin(out, step)
    stage("begin")
    (tmp / "config.json").write_text("{}")
    (tmp / "model.safetensors").write_bytes(b"\0" * 10)  # half of the weights
    stage("weights_partial")
    (tmp / "model.safetensors").write_bytes(b"\0" * 20)
    stage("weights")
    (tmp / "tokenizer.json").write_text("{}")
    stage("tokenizer")
    (tmp / "optimizer.pt").write_bytes(b"opt")
    stage("optimizer")
    (tmp / ck.STATE_FILE).write_text('{"step": ')  # cut mid-write
    stage("state_partial")
    (tmp / ck.STATE_FILE).write_text(json.dumps({"step": step}))
    stage("state")
    return ck.commit(tmp, ck.checkpoint_path(out, step))


def _names(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_complete_save(tmp_path):
    path = _save(tmp_path, 3)
    assert path == tmp_path / "checkpoints" / "step_3"
    assert ck.is_complete(path) and (path / ck.COMPLETE_FILE).is_file()
    assert json.loads((path / ck.COMPLETE_FILE).read_text()) == {"step": 3}
    assert ck.newest_complete_checkpoint(tmp_path) == path
    assert _names(tmp_path) == ["step_3"]  # no temporary left behind


@pytest.mark.parametrize("crash_at", STAGES)
def test_interrupted_save_leaves_nothing_that_looks_complete(tmp_path, crash_at):
    _save(tmp_path, 1)
    with pytest.raises(Crash):
        _save(tmp_path, 2, crash_at=crash_at)
    assert not (tmp_path / "checkpoints" / "step_2").exists()
    assert _names(tmp_path) == [".step_2.tmp", "step_1"]
    assert not ck.is_complete(tmp_path / "checkpoints" / ".step_2.tmp")  # a leftover never counts
    assert ck.newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_1"
    # the next save cleans the leftover
    _save(tmp_path, 3)
    assert _names(tmp_path) == ["step_1", "step_3"]


@pytest.mark.parametrize("replace_call", [1, 2])
def test_crash_inside_commit_when_overwriting_a_step(tmp_path, monkeypatch, replace_call):
    """Saving step 2 again (a run resumed from step 1): the old step_2 moves aside, the new one
    moves in. A crash between or at the renames leaves no step_2 at all, never a mixed one."""
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == replace_call:
            raise Crash("rename")
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", replace)
    with pytest.raises(Crash):
        _save(tmp_path, 2)
    monkeypatch.undo()
    newest = ck.newest_complete_checkpoint(tmp_path)
    if replace_call == 1:  # nothing moved yet: the old step_2 stands
        assert newest == tmp_path / "checkpoints" / "step_2"
    else:  # old moved aside, new not in: step_1 is the newest complete one
        assert not (tmp_path / "checkpoints" / "step_2").exists()
        assert newest == tmp_path / "checkpoints" / "step_1"
    _save(tmp_path, 3)
    assert _names(tmp_path) == (["step_1", "step_2", "step_3"] if replace_call == 1 else ["step_1", "step_3"])


def test_commit_refuses_a_directory_with_a_file_missing(tmp_path):
    tmp = ck.begin(tmp_path, 5)
    (tmp / "config.json").write_text("{}")
    (tmp / "model.safetensors").write_bytes(b"w")
    (tmp / ck.STATE_FILE).write_text(json.dumps({"step": 5}))
    with pytest.raises(ck.IncompleteCheckpoint, match="optimizer.pt"):
        ck.commit(tmp, ck.checkpoint_path(tmp_path, 5))
    (tmp / "optimizer.pt").write_bytes(b"o")
    with pytest.raises(ck.IncompleteCheckpoint, match="says step 5"):
        ck.commit(tmp, ck.checkpoint_path(tmp_path, 6))
    assert ck.newest_complete_checkpoint(tmp_path) is None


def test_newest_complete_skips_incomplete_and_foreign_directories(tmp_path):
    for step in (2, 10):
        _save(tmp_path, step)
    root = tmp_path / "checkpoints"
    # a step_N directory that is not complete (written by hand or by the old non-atomic save
    # that crashed): no trainer_state.json
    (root / "step_11").mkdir()
    (root / "step_11" / "config.json").write_text("{}")
    (root / "step_12").mkdir()  # empty
    (root / "notes").mkdir()
    (root / "step_x").mkdir()
    (root / ".step_13.tmp").mkdir()
    assert ck.newest_complete_checkpoint(tmp_path) == root / "step_10"  # 10 > 2 numerically
    assert [s for s, _ in ck.complete_checkpoints(tmp_path)] == [2, 10]
    assert ck.newest_complete_checkpoint(tmp_path / "elsewhere") is None


def test_legacy_checkpoint_without_marker_counts_when_its_files_are_there(tmp_path):
    legacy = tmp_path / "checkpoints" / "step_4"
    legacy.mkdir(parents=True)
    for name, text in [("config.json", "{}"), ("optimizer.pt", "o"), ("model.safetensors", "w"),
                       (ck.STATE_FILE, json.dumps({"step": 4}))]:
        (legacy / name).write_text(text)
    assert ck.newest_complete_checkpoint(tmp_path) == legacy
    (legacy / ck.STATE_FILE).write_text('{"step": 4')  # cut short
    assert ck.newest_complete_checkpoint(tmp_path) is None


# --- trainer.resume_from -----------------------------------------------------------------


def test_resume_null_is_a_fresh_run_even_with_checkpoints(tmp_path):
    _save(tmp_path, 1)
    assert ck.resolve_resume(None, tmp_path) == (None, None)


def test_resume_auto(tmp_path):
    path, line = ck.resolve_resume("auto", tmp_path)
    assert path is None and "no complete checkpoint" in line and "step 0" in line
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    with pytest.raises(Crash):
        _save(tmp_path, 3, crash_at="optimizer")
    path, line = ck.resolve_resume("auto", tmp_path)
    assert path == str(tmp_path / "checkpoints" / "step_2") and path in line


def test_resume_path_missing_or_incomplete_names_field_value_and_fix(tmp_path):
    _save(tmp_path, 2)
    missing = str(tmp_path / "checkpoints" / "step_7")
    with pytest.raises(ConfigError) as info:
        ck.resolve_resume(missing, tmp_path / "other_run")
    msg = str(info.value)
    assert f"trainer.resume_from = {missing!r} does not exist" in msg
    assert "step_2" in msg and "trainer.resume_from=auto" in msg and "Fix:" in msg
    assert "\n" not in msg

    with pytest.raises(Crash):
        _save(tmp_path, 3, crash_at="weights")
    leftover = str(tmp_path / "checkpoints" / ".step_3.tmp")
    with pytest.raises(ConfigError, match="leftover of an interrupted save"):
        ck.resolve_resume(leftover, tmp_path)
    broken = tmp_path / "checkpoints" / "step_5"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as info:
        ck.resolve_resume(str(broken), tmp_path)
    msg = str(info.value)
    assert "is not a complete checkpoint" in msg and "optimizer.pt" in msg and "trainer_state.json" in msg
    assert ck.resolve_resume(str(tmp_path / "checkpoints" / "step_2"), tmp_path)[0] == str(
        tmp_path / "checkpoints" / "step_2")


# --- a real learner's files ----------------------------------------------------------------


def test_learner_save_through_begin_and_commit_round_trips(tmp_path, tiny_model_dir, make_learner):
    """Learner rank 0 writes into the temporary directory (as the trainer passes it); after
    commit the checkpoint is complete, loads in transformers, and its training state loads."""
    from transformers import AutoModelForCausalLM

    learner = make_learner(tiny_model_dir)
    tmp = ck.begin(tmp_path, 1)
    learner.save_checkpoint(str(tmp), tiny_model_dir)
    assert not ck.is_complete(tmp)  # no trainer_state.json yet: the driver writes it
    (tmp / ck.STATE_FILE).write_text(json.dumps({"step": 1}))
    path = ck.commit(tmp, ck.checkpoint_path(tmp_path, 1))
    assert ck.newest_complete_checkpoint(tmp_path) == path
    AutoModelForCausalLM.from_pretrained(path)
    make_learner(tiny_model_dir, init_weights_path=str(path)).load_training_state(str(path))
