"""Synthetic traces and their JSON round trip (the benchmark on traces: tests/test_rollout_bench.py)."""

import json

import numpy as np
import pytest

from scheduling.traces import Trace, load_trace, save_trace, synthetic_trace


@pytest.mark.parametrize("kind", ["lognormal", "pareto"])
def test_synthetic_shape_and_long_tail(kind):
    tr = synthetic_trace(kind, prompts=40, group_size=16, max_new_tokens=2048, seed=1)
    assert len(tr.items) == 640
    groups = [g for g, _, _ in tr.items]
    assert all(groups.count(g) == 16 for g in set(groups)) and len(set(groups)) == 40
    lengths = np.array(tr.lengths)
    assert lengths.min() >= 1 and lengths.max() <= 2048
    # long tail: the mean clearly exceeds the median and the top 1% is far out
    assert lengths.mean() > 1.15 * np.median(lengths)
    assert np.quantile(lengths, 0.99) > 3 * np.median(lengths)
    # same seed, same trace; other seed, other trace
    assert synthetic_trace(kind, 40, 16, 2048, seed=1).items == tr.items
    assert synthetic_trace(kind, 40, 16, 2048, seed=2).items != tr.items


def test_json_round_trip(tmp_path):
    tr = synthetic_trace("pareto", prompts=3, group_size=4, max_new_tokens=64, seed=0)
    path = tmp_path / "t.json"
    save_trace(path, tr)
    doc = json.loads(path.read_text())
    assert doc["format"] == "rl-infinite/length-trace" and len(doc["groups"]) == 3
    back = load_trace(path)
    assert back.items == tr.items
    assert back.max_new_tokens == 64 and back.prompt_ids == tr.prompt_ids


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"groups": []}))
    with pytest.raises(ValueError, match="length-trace"):
        load_trace(path)
    with pytest.raises(ValueError):
        Trace([(0, 10, 65)], max_new_tokens=64)
