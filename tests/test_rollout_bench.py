"""`python -m rl.bench rollout --simulate`: CLI, JSON, PNG; and the shipped SmolLM2 traces."""

import json
from pathlib import Path

import pytest

from rl.bench.__main__ import main
from scheduling import load_trace

TRACES = sorted((Path(__file__).resolve().parents[1] / "configs" / "traces").glob("*.json"))


def test_simulate_synthetic_writes_rows_json_and_plot(tmp_path, capsys):
    out = tmp_path / "sim.json"
    rc = main(["rollout", "--simulate", "--synthetic", "pareto", "--prompts", "6",
               "--group-size", "4", "--max-new-tokens", "64", "--slots", "8",
               "--warmup-steps", "1", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [r["policy"] for r in rows] == ["full_group", "naive_micro", "continuous",
                                          "length_aware", "length_aware"]
    assert [r["predictor"] for r in rows[3:]] == ["oracle", "token_conditioned"]
    for r in rows:
        assert r["decode_steps"] >= 1 and r["total_tokens"] == rows[0]["total_tokens"]
        if r["policy"] != "full_group":  # full_group ignores the slots, so the bound is not its
            assert r["decode_steps"] >= r["lower_bound"]
    assert rows[0]["peak_kv_vs_full"] == 1.0
    assert (tmp_path / "sim.png").stat().st_size > 0
    assert "length_aware" in capsys.readouterr().out


def test_simulate_a_trace_file_with_a_warmup_trace(tmp_path):
    from scheduling import save_trace, synthetic_trace

    step0, step1 = tmp_path / "s0.json", tmp_path / "s1.json"
    save_trace(step0, synthetic_trace("lognormal", 5, 4, 128, seed=1))
    save_trace(step1, synthetic_trace("lognormal", 5, 4, 128, seed=2))
    out = tmp_path / "r.json"
    main(["rollout", "--simulate", "--lengths", str(step1), "--warmup-lengths", str(step0),
          "--policies", "continuous,length_aware", "--predictor", "token_conditioned",
          "--slots", "4", "--json", str(out), "--plot", str(tmp_path / "p.png")])
    doc = json.loads(out.read_text())
    assert doc["sequences"] == 20 and doc["warmup"] == [str(step0)]
    assert [r["policy"] for r in doc["rows"]] == ["continuous", "length_aware"]
    assert (tmp_path / "p.png").exists()


@pytest.mark.parametrize("path", TRACES, ids=[p.name for p in TRACES])
def test_shipped_traces_are_real_smollm2_rollouts_with_g16(path):
    trace = load_trace(path)
    assert trace.meta["model"] == "SmolLM2-135M-Instruct"
    assert trace.meta["group_size"] == 16
    counts = {}
    for g, _, _ in trace.items:
        counts[g] = counts.get(g, 0) + 1
    assert set(counts.values()) == {16} and len(counts) >= 32
    assert set(trace.prompt_ids) == set(counts)  # prompt ids feed the learned predictor
    assert 1 <= min(trace.lengths) and max(trace.lengths) <= trace.max_new_tokens
