"""`python -m rl.bench rollout --simulate`: rows, CLI, JSON, PNG; and the shipped SmolLM2 traces."""

import json
from pathlib import Path

import pytest

from rl.bench.__main__ import main
from rl.bench.rollout import format_table, simulate_policies, time_fptas
from scheduling import load_trace, save_trace, synthetic_trace

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
    step0, step1 = tmp_path / "s0.json", tmp_path / "s1.json"
    save_trace(step0, synthetic_trace("lognormal", 5, 4, 128, seed=1))
    save_trace(step1, synthetic_trace("lognormal", 5, 4, 128, seed=2))
    out = tmp_path / "r.json"
    rc = main(["rollout", "--simulate", "--lengths", str(step1), "--warmup-lengths", str(step0),
               "--policies", "continuous,length_aware", "--predictor", "token_conditioned",
               "--slots", "4", "--json", str(out), "--plot", str(tmp_path / "p.png")])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["sequences"] == 20 and doc["warmup"] == [str(step0)]
    assert [r["policy"] for r in doc["rows"]] == ["continuous", "length_aware"]
    assert (tmp_path / "p.png").exists()


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


def test_simulate_trace_file_prints_summary_table_and_writes_json(tmp_path, capsys):
    tr = synthetic_trace("lognormal", prompts=4, group_size=4, max_new_tokens=128, seed=0)
    src, out = tmp_path / "trace.json", tmp_path / "rows.json"
    save_trace(src, tr)
    rc = main(["rollout", "--simulate", "--lengths", str(src), "--slots", "4",
               "--predictor", "oracle, constant", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"trace: 16 sequences, 4 prompts, mean length {sum(tr.lengths) / 16:.1f}" in printed
    assert "naive_micro" in printed and "constant" in printed
    doc = json.loads(out.read_text())
    assert doc["sequences"] == 16 and doc["groups"] == 4
    assert [(r["policy"], r["predictor"]) for r in doc["rows"]][-2:] == [("length_aware", "oracle"),
                                                                       ("length_aware", "constant")]


def test_time_fptas_reports_the_packing_and_its_times():
    t = time_fptas(n=256, capacity_fraction=0.25, repeats=2)
    assert t["n"] == 256 and t["eps"] == 0.05 and 0 < t["chosen"] < 256
    assert 0 < t["best_ms"] <= t["median_ms"]


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


def test_replaying_a_runs_steps_carries_the_predictor_over_and_sums_them(tmp_path):
    """Several --lengths: each step is simulated as a single trace whose warm-up is every
    earlier step; the rows are the sums over the steps."""
    from rl.bench.rollout import replay_steps

    steps = [synthetic_trace("lognormal", 4, 8, 128, seed=s) for s in range(3)]
    rows = replay_steps(steps, [], ["continuous", "length_aware"], slots=8, kv_budget_tokens=2048,
                        predictor="token_conditioned")
    alone = []
    for k, trace in enumerate(steps):
        from rl.bench.rollout import warm_predictor
        from scheduling import make_predictor

        pred = warm_predictor(make_predictor("token_conditioned"), steps[:k])
        alone.append(simulate_policies(trace, ["continuous", "length_aware"], 8, 2048, pred))
    for i, name in enumerate(["continuous", "length_aware"]):
        assert rows[i]["policy"] == name and rows[i]["traces"] == 3
        assert rows[i]["decode_steps"] == sum(a[i]["decode_steps"] for a in alone)
        assert rows[i]["lower_bound"] == sum(a[i]["lower_bound"] for a in alone)
        assert rows[i]["peak_kv_tokens"] == max(a[i]["peak_kv_tokens"] for a in alone)
    mae = sum(a[1]["predictor_mae"] * len(t.items) for a, t in zip(alone, steps)) / sum(len(t.items) for t in steps)
    assert rows[1]["predictor_mae"] == pytest.approx(mae)
    # the carried predictor matters: a cold start at every step plans differently
    cold = [simulate_policies(t, ["length_aware"], 8, 2048, "token_conditioned")[0] for t in steps]
    assert sum(c["predictor_mae"] for c in cold) != pytest.approx(sum(a[1]["predictor_mae"] for a in alone))

    paths = []
    for k, trace in enumerate(steps):
        paths.append(str(tmp_path / f"step_{k}.json"))
        save_trace(paths[-1], trace)
    out_json = tmp_path / "replay.json"
    assert main(["rollout", "--simulate", "--lengths", *paths, "--slots", "8", "--kv-budget", "2048",
                 "--policies", "continuous,length_aware", "--predictor", "token_conditioned",
                 "--json", str(out_json)]) == 0
    doc = json.loads(out_json.read_text())
    assert [r["decode_steps"] for r in doc["rows"]] == [r["decode_steps"] for r in rows]
    assert doc["sequences"] == sum(len(t.items) for t in steps)


def test_prompt_mean_oracle_predicts_each_prompts_true_mean_length():
    from rl.bench.rollout import prompt_mean_lengths
    from scheduling import Trace

    trace = Trace([(0, 5, 10), (0, 5, 30), (1, 7, 4), (1, 7, 8), (1, 7, 9)], 32)
    assert prompt_mean_lengths(trace) == {0: 20.0, 1: 20.0, 2: 7.0, 3: 7.0, 4: 7.0}
    rows = simulate_policies(trace, ["length_aware"], 2, 1000, "oracle_prompt_mean")
    assert rows[0]["predictor"] == "oracle_prompt_mean"
    # |20 - 10| + |20 - 30| + |7 - 4| + |7 - 8| + |7 - 9| over 5 samples
    assert rows[0]["predictor_mae"] == pytest.approx(26 / 5)
