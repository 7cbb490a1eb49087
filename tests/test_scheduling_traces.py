"""Synthetic traces, JSON round trip, benchmark rows and CLI."""

import json

import numpy as np
import pytest

from scheduling.bench import format_table, main, simulate_policies
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


def test_simulate_policies_rows():
    tr = synthetic_trace("lognormal", prompts=8, group_size=16, max_new_tokens=512, seed=4)
    rows = simulate_policies(tr, slots=16, kv_budget_tokens=10**6, predictor="oracle")
    by = {r["policy"]: r for r in rows}
    assert set(by) == {"full_group", "naive_micro", "continuous", "length_aware"}
    for r in rows:
        assert r["total_tokens"] == sum(tr.lengths)
    # naive rounds wait for their longest member: never faster than continuous refill
    assert by["naive_micro"]["decode_steps"] >= by["continuous"]["decode_steps"]
    assert by["full_group"]["decode_steps"] == max(tr.lengths)
    # micro policies hold far less KV than everything at once (G = 16, 16 slots of 128 seqs)
    assert by["length_aware"]["peak_kv_vs_full"] <= 0.5
    text = format_table(rows)
    assert "length_aware" in text and len(text.splitlines()) == 6


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    tr = synthetic_trace("lognormal", prompts=4, group_size=4, max_new_tokens=128, seed=0)
    src, out = tmp_path / "trace.json", tmp_path / "rows.json"
    save_trace(src, tr)
    main(["--lengths", str(src), "--slots", "4", "--predictor", "oracle,constant", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "naive_micro" in printed and "constant" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["policy"] for r in rows][-2:] == ["length_aware", "length_aware"]
