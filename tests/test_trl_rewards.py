"""TRL's own reward functions load and score unchanged, called the way TRL's GRPOTrainer calls
them: every input by keyword; for a conversational prompt (rendered with the chat template,
told by the `prompt_messages` column) `prompts` as message lists and `completions` as
[{"role": "assistant", "content": ...}]; strings otherwise; every dataset column a keyword.

Stand-ins with the signatures and behaviour of trl.rewards run everywhere; the real
functions run where trl is installed (it is not a project dependency: `pip install --no-deps
trl`, the `bench` extra)."""

import textwrap

import pytest

from rewards import RewardExecutor, RewardFunctionConfig, load_reward_functions
from rewards.loading import PROMPT_MESSAGES

# The signatures and bodies of trl.rewards (trl 1.16) that matter here, minus math-verify.
STANDINS = textwrap.dedent('''
    import re

    CALLS = []

    def think_format_reward(completions, **kwargs):
        pattern = r"^<think>(?!.*<think>)(.*?)</think>.*$"
        contents = [completion[0]["content"] for completion in completions]
        return [1.0 if re.match(pattern, c, re.DOTALL | re.MULTILINE) else 0.0 for c in contents]

    def accuracy_reward(completions, solution, log_extra=None, **kwargs):
        contents = [completion[0]["content"] for completion in completions]
        out = []
        for content, sol in zip(contents, solution, strict=True):
            m = re.search(r"\\\\boxed\\{(.*)\\}", content)
            out.append(None if not sol else float(m is not None and m.group(1) == sol))
        return out

    class _SoftOverlongPunishment:
        __name__ = "soft_overlong_punishment_reward"

        def __init__(self, max_completion_len, soft_punish_cache):
            self.max_completion_len, self.soft_punish_cache = max_completion_len, soft_punish_cache

        def __call__(self, completion_ids, **kwargs):
            out = []
            for ids in completion_ids:
                n, m, c = len(ids), self.max_completion_len, self.soft_punish_cache
                out.append(0.0 if n <= m - c else ((m - c - n) / c if n <= m else -1.0))
            return out

    def get_soft_overlong_punishment(max_completion_len, soft_punish_cache):
        return _SoftOverlongPunishment(max_completion_len, soft_punish_cache)

    overlong = get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)

    def spy(prompts, completions, **kwargs):
        CALLS.append({"prompts": prompts, "completions": completions, "kwargs": sorted(kwargs)})
        return [0.0] * len(completions)
''')

SYSTEM = {"role": "system", "content": "Reason, then answer in \\boxed{}."}
QUESTIONS = ["What is 1/3 of 1?", "What is 2 + 2?"]
MESSAGES = [[SYSTEM, {"role": "user", "content": q}] for q in QUESTIONS]
RENDERED = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in QUESTIONS]
COMPLETIONS = ["<think>one third</think>\\boxed{1/3}", "four: \\boxed{5}", "<think>a</think>\\boxed{4}",
               "<think>x<think>y</think>"]
GROUP = [0, 0, 1, 1]
SOLUTION = ["1/3", "1/3", "4", "4"]
IDS = [[1] * 5, [1] * 7, [1] * 8, [1] * 12]


def _columns(conversational: bool) -> dict:
    return {"solution": SOLUTION, "completion_ids": IDS, "data_source": ["math"] * 4,
            PROMPT_MESSAGES: [MESSAGES[g] if conversational else None for g in GROUP]}


@pytest.fixture
def standins(tmp_path):
    path = tmp_path / "trl_standins.py"
    path.write_text(STANDINS)
    return str(path)


def _score(paths, conversational=True, workers=0, names=None):
    fns = load_reward_functions([RewardFunctionConfig(path=p, name=n) for p, n in zip(paths, names or [None] * len(paths))])
    with RewardExecutor(fns, num_workers=workers, on_error="value", error_value=-9.0) as ex:
        return fns, ex.score([RENDERED[g] for g in GROUP], COMPLETIONS, _columns(conversational), GROUP)


def test_standins_detected_as_trl(standins):
    fns = load_reward_functions([{"path": f"{standins}:{name}"} for name in
                                 ("think_format_reward", "accuracy_reward", "overlong", "spy")])
    assert [f.plan.convention for f in fns] == ["trl"] * 4
    assert all(f.plan.batched for f in fns)
    assert fns[2].name == "overlong"


@pytest.mark.parametrize("workers", [0, 1])
def test_conversational_standins_score_as_in_trl(standins, workers):
    paths = [f"{standins}:{n}" for n in ("think_format_reward", "accuracy_reward", "overlong")]
    _, r = _score(paths, workers=workers)
    assert r.scores["think_format_reward"] == [1.0, 0.0, 1.0, 0.0]
    assert r.scores["accuracy_reward"] == [1.0, 0.0, 1.0, 0.0]  # "solution" found among **kwargs' columns
    # (E - n) / cache with E = 10 - 4: 5 -> 0, 7 -> -0.25, 8 -> -0.5, 12 -> -1 (longer than 10)
    assert r.scores["overlong"] == [0.0, -0.25, -0.5, -1.0]
    assert r.metrics["reward/errors"] == 0.0


def test_inputs_are_what_trl_passes(standins):
    fns, _ = _score([f"{standins}:spy"])
    module = fns[0].fn.__globals__
    (call,) = module["CALLS"]
    assert call["prompts"] == [MESSAGES[g] for g in GROUP]
    assert call["completions"] == [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    # every dataset column as a keyword, plus the token ids; the reserved column is consumed
    assert call["kwargs"] == ["completion_ids", "data_source", "solution"]


def test_plain_text_prompts_stay_strings(standins):
    fns, r = _score([f"{standins}:spy", f"{standins}:think_format_reward"], conversational=False)
    (call,) = fns[0].fn.__globals__["CALLS"]
    assert call["prompts"] == [RENDERED[g] for g in GROUP]
    assert call["completions"] == COMPLETIONS
    # TRL's format reward indexes completion[0]["content"]: on a standard (string) dataset it
    # fails in TRL too; here that is a counted error, not a silent zero.
    assert r.metrics["reward/think_format_reward/errors"] == 4.0


def test_other_conventions_never_see_the_column(tmp_path):
    path = tmp_path / "plain_rewards.py"
    path.write_text("def plain(prompt, completion, **columns):\n"
                    "    assert 'prompt_messages' not in columns and isinstance(prompt, str)\n"
                    "    return float(len(columns))\n")
    _, r = _score([f"{path}:plain"])
    assert r.scores["plain"] == [3.0] * 4  # solution, completion_ids, data_source


def test_without_the_column_everything_is_a_string(standins):
    fns = load_reward_functions([{"path": f"{standins}:spy"}])
    with RewardExecutor(fns, num_workers=0) as ex:
        ex.score(["p"] * 2, ["a", "b"], {"answer": ["1", "2"]})
    (call,) = fns[0].fn.__globals__["CALLS"]
    assert call["prompts"] == ["p", "p"] and call["completions"] == ["a", "b"] and call["kwargs"] == ["answer"]


def test_real_trl_rewards(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("math_verify")
    mod = tmp_path / "my_trl_rewards.py"
    mod.write_text("from trl.rewards import get_soft_overlong_punishment\n"
                   "overlong = get_soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)\n")
    paths = ["trl.rewards:think_format_reward", "trl.rewards:accuracy_reward", f"{mod}:overlong"]
    fns, r = _score(paths, workers=1)
    assert [f.plan.convention for f in fns] == ["trl"] * 3
    assert r.scores["think_format_reward"] == [1.0, 0.0, 1.0, 0.0]
    assert r.scores["accuracy_reward"] == [1.0, 0.0, 1.0, 0.0]
    assert r.scores["overlong"] == [0.0, -0.25, -0.5, -1.0]
