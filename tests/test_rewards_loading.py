"""Config-time loading: every mistake becomes a RewardError that names the function and the fix.
Also the registry and the combination rule (pure functions, no processes)."""

from __future__ import annotations

import importlib.util

import pytest

from rewards import RewardError, RewardExecutor, RewardFunctionConfig, load_reward_functions
from rewards.calling import ERROR, OK, TIMEOUT
from rewards.combine import combine
from rewards.loading import LoadedReward, make_plan
from rewards.registry import lookup, register_path, registered_names


def _write(tmp_path, src, name="user_reward.py"):
    path = tmp_path / name
    path.write_text(src)
    return str(path)


def test_module_that_does_not_import():
    with pytest.raises(RewardError, match=r"'no_such_pkg\.rewards:f'.*could not be imported.*Fix:"):
        load_reward_functions([RewardFunctionConfig(path="no_such_pkg.rewards:f")])


def test_module_whose_import_raises(tmp_path):
    path = _write(tmp_path, "raise RuntimeError('broken at import')\n")
    with pytest.raises(RewardError, match=r"raised RuntimeError: broken at import.*Fix:"):
        load_reward_functions([RewardFunctionConfig(path=f"{path}:f")])


def test_name_not_in_module_lists_the_callables():
    with pytest.raises(RewardError, match=r"has no attribute 'nope'.*math_verify_reward"):
        load_reward_functions([RewardFunctionConfig(path="rewards.builtin:nope")])


def test_file_not_found(tmp_path):
    with pytest.raises(RewardError, match=r"does not exist.*Fix: correct the file path"):
        load_reward_functions([RewardFunctionConfig(path=f"{tmp_path}/missing.py:f")])


def test_unknown_short_name_lists_registered_names():
    with pytest.raises(RewardError, match=r"'math_verfy'.*math_verify"):
        load_reward_functions([RewardFunctionConfig(path="math_verfy")])


@pytest.mark.parametrize("src", ["def f(x, y):\n    return 1.0\n", "def f(*args):\n    return 1.0\n",
                                 "f = 3\n"])
def test_signature_matching_no_convention(tmp_path, src):
    path = _write(tmp_path, src)
    with pytest.raises(RewardError, match=r"'.*user_reward.py:f'.*Fix:"):
        load_reward_functions([RewardFunctionConfig(path=f"{path}:f")])


def test_explicit_convention_with_other_names(tmp_path):
    path = _write(tmp_path, "def f(q, a, answer=None):\n    return float(a == answer)\n")
    [fn] = load_reward_functions([RewardFunctionConfig(path=f"{path}:f", convention="plain")])
    assert fn.plan.positional == ("prompt", "completion") and fn.plan.column_params == ("answer",)
    with RewardExecutor([fn], num_workers=0) as ex:
        assert ex.score(["p", "p"], ["x", "y"], {"answer": ["x", "x"]}, [0, 0]).rewards == [1.0, 0.0]


def test_kwargs_checked_against_signature(tmp_path):
    path = _write(tmp_path, "def f(completion, scale=1.0):\n    return scale\n")
    with pytest.raises(RewardError, match=r"kwargs \['scal'\] are not parameters"):
        load_reward_functions([RewardFunctionConfig(path=f"{path}:f", kwargs={"scal": 2.0})])
    with pytest.raises(RewardError, match=r"collide"):
        load_reward_functions([RewardFunctionConfig(path=f"{path}:f", kwargs={"completion": "x"})])
    [fn] = load_reward_functions([RewardFunctionConfig(path=f"{path}:f", kwargs={"scale": 2.0})])
    with RewardExecutor([fn], num_workers=0) as ex:  # kwargs win over a same-named column
        assert ex.score(["p"], ["c"], {"scale": [5.0]}, [0]).rewards == [2.0]


def test_missing_required_column_is_reported_at_score_time(tmp_path):
    path = _write(tmp_path, "def f(completion, answer):\n    return 1.0\n")
    with RewardExecutor(load_reward_functions([RewardFunctionConfig(path=f"{path}:f")]), num_workers=0) as ex:
        with pytest.raises(RewardError, match=r"'f' needs columns \['answer'\].*\['solution'\]"):
            ex.score(["p"], ["c"], {"solution": ["1"]}, [0])


def test_bad_spec_values():
    with pytest.raises(RewardError, match="convention"):
        RewardFunctionConfig(path="math_verify", convention="openrlhf")
    with pytest.raises(RewardError, match="weight"):
        RewardFunctionConfig(path="math_verify", weight=float("nan"))
    with pytest.raises(RewardError, match="distinct `name:`"):
        load_reward_functions([{"path": "exact_match"}, {"path": "rewards.builtin:exact_match_reward",
                                                         "name": "exact_match"}])
    with pytest.raises(RewardError, match="on_error"):
        RewardExecutor(load_reward_functions([{"path": "exact_match"}]), on_error="ignore", num_workers=0)


def test_dict_specs_and_names():
    fns = load_reward_functions([{"path": "math_verify", "weight": 2.0},
                                 {"path": "rewards.builtin:format_reward", "kwargs": {"full_match": False}}])
    assert [(f.name, f.weight) for f in fns] == [("math_verify", 2.0), ("format_reward", 1.0)]
    assert fns[0].path == "rewards.builtin:math_verify_reward"


def test_registry():
    names = registered_names()
    for name in ["math_verify", "exact_match", "format", "length_penalty", "dapo_overlong", "arithmetic"]:
        assert name in names
    assert lookup("arithmetic") == "rewards.arithmetic:arithmetic_reward"
    with pytest.raises(ValueError, match="already registered"):
        register_path("math_verify", "somewhere:else")


@pytest.mark.parametrize("name", [n for n in registered_names()])
def test_every_registered_name_loads(name):
    if name == "arithmetic" and importlib.util.find_spec("rewards.arithmetic") is None:
        pytest.skip("rewards/arithmetic.py is not written yet")
    [fn] = load_reward_functions([RewardFunctionConfig(path=name)])
    assert fn.name == name


# ---------------------------------------------------------------- combination rule
def _fn(name, weight):
    def f(completion):
        return 0.0
    return LoadedReward(name, f"x:{name}", weight, {}, make_plan(f, name, None, {}), f)


def test_weights_and_none_renormalize():
    fns = [_fn("a", 2.0), _fn("b", 1.0)]
    outcomes = [[(OK, 1.0, None), (OK, None, None), (OK, None, None)],
                [(OK, 0.5, None), (OK, 0.5, None), (OK, None, None)]]
    r = combine(fns, outcomes, [0, 1, 2], "raise", 0.0)
    # sample 0: 2*1 + 1*0.5 = 2.5
    # sample 1: only b applies; its weight 1 scales to the total 3: 3 * 0.5 = 1.5
    # sample 2: nothing applies: 0.0, counted as unscored
    assert r.rewards == [2.5, 1.5, 0.0]
    assert r.metrics["reward/unscored"] == 1.0
    assert r.metrics["reward/a/none"] == 2.0 and r.metrics["reward/a/mean"] == 1.0


def test_negative_weight_penalty_keeps_its_sign():
    fns = [_fn("acc", 1.0), _fn("pen", -0.5)]
    outcomes = [[(OK, None, None)], [(OK, 1.0, None)]]
    # total |w| = 1.5, applicable |w| = 0.5: scale 3; -0.5 * 1.0 * 3 = -1.5
    assert combine(fns, outcomes, [0], "raise", 0.0).rewards == [-1.5]


def test_error_policies_in_combination():
    fns = [_fn("a", 1.0)]
    outcomes = [[(OK, 1.0, None), (ERROR, "boom", None), (OK, 1.0, None), (TIMEOUT, "timed out", None)]]
    group = [0, 0, 1, 2]
    r = combine(fns, outcomes, group, "value", -2.0)
    assert r.rewards == [1.0, -2.0, 1.0, -2.0] and all(r.valid)
    assert (r.metrics["reward/a/errors"], r.metrics["reward/a/timeouts"]) == (1.0, 1.0)
    r = combine(fns, outcomes, group, "skip_group", 0.0)
    assert r.valid == [False, False, True, False]
    assert r.metrics["reward/invalid"] == 3.0
