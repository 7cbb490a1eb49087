"""Prompt data: local files, chat template, column checks, resumable order."""

import json

import pytest

from rl.config import DataConfig
from rl.data import PromptSource, load_rows
from rl.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_with_chat_template(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": f"What is {i} + 1?", "solution": str(i + 1)} for i in range(10)])
    src = PromptSource(DataConfig(path=str(path), prompt_key="question", answer_key="solution",
                                  prompts_per_step=4, system_prompt="Be brief."), tokenizer, seed=0)
    p = src.next_batch()[0]
    assert p.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is")
    assert p.text.endswith("<|im_start|>assistant\n")
    assert p.token_ids == tokenizer(p.text, add_special_tokens=False)["input_ids"]
    assert p.columns["solution"] == p.columns["answer"]  # answer_key is also exposed as `answer`


def test_csv_and_parquet(tmp_path, tokenizer):
    import datasets

    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(6)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"))
    for name in ("d.parquet", "d.csv"):
        ds = load_rows(DataConfig(path=str(tmp_path / name)))
        assert len(ds) == 6 and set(ds.column_names) == {"prompt", "answer"}


def test_missing_column_names_existing_columns(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "solution": "1"}])
    with pytest.raises(DataError, match=r"data.prompt_key = 'prompt'.*question, solution"):
        load_rows(DataConfig(path=str(path)))
    with pytest.raises(DataError, match=r"data.answer_key = 'answer'"):
        load_rows(DataConfig(path=str(path), prompt_key="question"))


def test_missing_file_is_a_data_error():
    with pytest.raises(DataError, match="could not be loaded"):
        load_rows(DataConfig(path="./no/such/file.jsonl"))


def test_order_resumes_exactly(tokenizer):
    cfg = DataConfig(path="builtin:arithmetic", prompts_per_step=7)
    a = PromptSource(cfg, tokenizer, seed=3)
    first = [p.index for _ in range(5) for p in a.next_batch()]
    state = a.state_dict()
    rest = [p.index for _ in range(4) for p in a.next_batch()]
    b = PromptSource(cfg, tokenizer, seed=3)
    b.load_state_dict(state)
    assert [p.index for _ in range(4) for p in b.next_batch()] == rest
    c = PromptSource(cfg, tokenizer, seed=4)
    assert [p.index for _ in range(5) for p in c.next_batch()] != first  # the seed matters


def test_epochs_wrap_and_reshuffle(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "answer": "1"} for i in range(5)])
    src = PromptSource(DataConfig(path=str(path), prompts_per_step=5), tokenizer, seed=0)
    e0, e1 = [p.index for p in src.next_batch()], [p.index for p in src.next_batch()]
    assert sorted(e0) == sorted(e1) == list(range(5))
    assert src.epoch == 1


def test_too_long_prompts_dropped_and_counted(tmp_path, tokenizer):
    rows = [{"prompt": "short", "answer": "1"}] * 3 + [{"prompt": "long " * 200, "answer": "1"}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    src = PromptSource(DataConfig(path=str(path), prompts_per_step=2, max_prompt_tokens=32), tokenizer)
    assert len(src.prompts) == 3 and src.dropped_too_long == 1
    with pytest.raises(DataError, match="prompts_per_step"):
        PromptSource(DataConfig(path=str(path), prompts_per_step=4, max_prompt_tokens=32), tokenizer)
