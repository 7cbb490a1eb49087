"""Each calling convention (TRL, verl, plain), sync and async, loaded unchanged from files
written to tmp_path and from module paths, scored through the process pool."""

from __future__ import annotations

import sys
import textwrap

import pytest

from rewards import RewardError, RewardExecutor, RewardFunctionConfig, load_reward_functions

# TRL documentation shape: batch in, one float (or None) per completion out, columns as kwargs.
TRL_SRC = r'''
import asyncio
import re


def boxed_reward(completions, ground_truth, **kwargs):
    """Reward 1 if the content of \boxed{} equals the ground truth."""
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


async def async_len(prompts, completions, **kwargs):
    await asyncio.sleep(0.01)
    return [float(len(c)) for c in completions]


def math_only(completions, task, **kwargs):
    # None: not applicable to this sample
    return [None if t == "code" else 1.0 for t in task]
'''

# verl documentation shape: compute_score per sample, float or dict with "score".
VERL_SRC = r'''
import asyncio
import re


def _extract(solution_str):
    boxed = re.findall(r"\\boxed\{([^}]*)\}", solution_str)
    if boxed:
        return boxed[-1]
    numbers = re.findall(r"-?\d+", solution_str)
    return numbers[-1] if numbers else None


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    answer = _extract(solution_str)
    acc = answer == ground_truth
    return {"score": 1.0 if acc else 0.0, "acc": acc, "pred": answer}


def gsm8k_like(solution_str, ground_truth, method="flexible", format_score=0.0, score=1.0):
    answer = _extract(solution_str)
    if answer is None:
        return 0.0
    return score if answer == ground_truth else format_score


async def async_compute_score(data_source, solution_str, ground_truth, extra_info=None):
    await asyncio.sleep(0.01)
    return 1.0 if _extract(solution_str) == ground_truth else 0.0
'''

PLAIN_SRC = r'''
import asyncio


def contains_answer(prompt, completion, answer):
    return float(answer in completion)


async def async_contains(prompt, completion, answer):
    await asyncio.sleep(0.01)
    return float(answer in completion)


def count_columns(completion, **columns):
    return float(len(columns))
'''

COMPLETIONS = ["The answer is \\boxed{4}", "\\boxed{5}", "4", "no idea"] * 2
N = len(COMPLETIONS)
COLUMNS = {"answer": ["4"] * N, "ground_truth": ["4"] * N, "task": ["math", "math", "code", "math"] * 2}
GROUP = [0, 0, 0, 0, 1, 1, 1, 1]

SPECS = [  # (file, function, name)
    ("trl", "boxed_reward", "trl_boxed"),
    ("trl", "reward_len", "trl_len"),
    ("trl", "async_len", "trl_async"),
    ("trl", "math_only", "trl_none"),
    ("verl", "compute_score", "verl_dict"),
    ("verl", "gsm8k_like", "verl_gsm8k"),
    ("verl", "async_compute_score", "verl_async"),
    ("plain", "contains_answer", "plain"),
    ("plain", "async_contains", "plain_async"),
    ("plain", "count_columns", "plain_kwargs"),
]


@pytest.fixture(scope="module", params=["file", "module"])
def scored(request, tmp_path_factory):
    """Score the batch once per way of naming the functions; returns (loaded fns, result)."""
    how = request.param
    folder = tmp_path_factory.mktemp(f"user_rewards_{how}")
    prefix = f"user_rewards_{how}_"
    for kind, src in [("trl", TRL_SRC), ("verl", VERL_SRC), ("plain", PLAIN_SRC)]:
        (folder / f"{prefix}{kind}.py").write_text(textwrap.dedent(src))
    if how == "module":
        sys.path.insert(0, str(folder))  # workers copy the parent's sys.path at start
    try:
        specs = []
        for kind, fn, name in SPECS:
            path = f"{folder}/{prefix}{kind}.py:{fn}" if how == "file" else f"{prefix}{kind}:{fn}"
            specs.append(RewardFunctionConfig(path=path, name=name))
        fns = load_reward_functions(specs)
        with RewardExecutor(fns, timeout_s=10.0, num_workers=2) as ex:
            result = ex.score(["What is 2+2?"] * N, COMPLETIONS, COLUMNS, GROUP)
    finally:
        if how == "module":
            sys.path.remove(str(folder))
    return fns, result


def test_conventions_detected(scored):
    fns, _ = scored
    got = {f.name: (f.plan.convention, f.plan.is_async) for f in fns}
    assert got == {
        "trl_boxed": ("trl", False), "trl_len": ("trl", False), "trl_async": ("trl", True),
        "trl_none": ("trl", False), "verl_dict": ("verl", False), "verl_gsm8k": ("verl", False),
        "verl_async": ("verl", True), "plain": ("plain", False), "plain_async": ("plain", True),
        "plain_kwargs": ("plain", False),
    }


def test_trl_batch_functions(scored):
    _, r = scored
    assert r.scores["trl_boxed"] == [1.0, 0.0, 0.0, 0.0] * 2
    assert r.scores["trl_len"] == [-abs(20 - len(c)) for c in COMPLETIONS]
    assert r.scores["trl_async"] == [float(len(c)) for c in COMPLETIONS]
    assert r.scores["trl_none"] == [1.0, 1.0, None, 1.0] * 2
    assert r.metrics["reward/trl_none/none"] == 2.0


def test_verl_functions(scored):
    _, r = scored
    # "\boxed{4}" and "4" are right, "\boxed{5}" and "no idea" are not
    assert r.scores["verl_dict"] == [1.0, 0.0, 1.0, 0.0] * 2
    assert r.scores["verl_gsm8k"] == [1.0, 0.0, 1.0, 0.0] * 2
    assert r.scores["verl_async"] == [1.0, 0.0, 1.0, 0.0] * 2
    # numeric sub-scores are logged; the string "pred" is ignored
    assert r.metrics["reward/verl_dict/acc/mean"] == 0.5
    assert not any(k.startswith("reward/verl_dict/pred") for k in r.metrics)


def test_plain_functions(scored):
    _, r = scored
    assert r.scores["plain"] == [1.0, 0.0, 1.0, 0.0] * 2
    assert r.scores["plain_async"] == [1.0, 0.0, 1.0, 0.0] * 2
    # **columns receives every dataset column
    assert r.scores["plain_kwargs"] == [3.0] * N


def test_combined_reward_and_metrics(scored):
    _, r = scored
    assert len(r.rewards) == N and r.valid == [True] * N
    assert r.metrics["reward/errors"] == 0.0 and r.metrics["reward/timeouts"] == 0.0
    for name in [s[2] for s in SPECS]:
        for key in ("mean", "std", "seconds", "errors", "timeouts"):
            assert f"reward/{name}/{key}" in r.metrics
    # sample 2 ("4", a code task): trl_none is None, so the other nine weights (all 1) scale by 10/9
    applicable = [r.scores[s[2]][2] for s in SPECS if r.scores[s[2]][2] is not None]
    assert r.rewards[2] == pytest.approx(sum(applicable) * 10 / 9)


def test_verl_ground_truth_mapping():
    """ground_truth column > reward_model.ground_truth > answer; data_source default "unknown"."""
    def verl_echo(data_source, solution_str, ground_truth, extra_info=None):
        return {"score": float(ground_truth == solution_str), "unknown_src": data_source == "unknown",
                "no_extra": extra_info is None}

    from rewards.loading import LoadedReward, make_plan
    fn = LoadedReward("echo", "x:verl_echo", 1.0, {}, make_plan(verl_echo, "echo", None, {}), verl_echo)
    with RewardExecutor([fn], num_workers=0) as ex:  # in-process: the mapping is the same code
        r = ex.score(["p"] * 2, ["a", "b"], {"answer": ["a", "a"]}, [0, 0])
        assert r.scores["echo"] == [1.0, 0.0]
        assert r.metrics["reward/echo/unknown_src/mean"] == 1.0
        assert r.metrics["reward/echo/no_extra/mean"] == 1.0
        r = ex.score(["p"] * 2, ["a", "b"], {"answer": ["x", "x"], "reward_model": [{"ground_truth": "b"}] * 2,
                                             "data_source": ["gsm8k"] * 2, "extra_info": [{"i": 0}] * 2}, [0, 0])
        assert r.scores["echo"] == [0.0, 1.0]
        assert r.metrics["reward/echo/unknown_src/mean"] == 0.0
        assert r.metrics["reward/echo/no_extra/mean"] == 0.0
        r = ex.score(["p"], ["a"], {"ground_truth": ["a"], "answer": ["b"]}, [0])
        assert r.scores["echo"] == [1.0]


def test_many_chunks_keep_sample_order():
    # 300 samples -> per-sample chunks of 38 (plain) and one chunk per worker (TRL)
    fns = load_reward_functions([RewardFunctionConfig(path="rl.bench.rewards:trivial_trl"),
                                 RewardFunctionConfig(path="length_penalty", kwargs={"budget": 1}, weight=0.0)])
    completions = ["x" * (1 + i % 3) for i in range(300)]
    ex = RewardExecutor(fns, num_workers=2)
    r = ex.score(["p"] * 300, completions, {}, [i // 6 for i in range(300)])
    assert r.scores["length_penalty"] == [-min(1.0, float(len(c) - 1)) if len(c) > 1 else 0.0
                                          for c in completions]
    assert r.scores["trivial_trl"] == [1.0] * 300
    ex.close()
    with pytest.raises(RewardError, match="closed"):
        ex.score(["p"], ["c"], {}, [0])
