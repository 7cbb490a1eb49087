"""Prompt data: load with `datasets`, apply the chat template, tokenize, iterate with a resumable position."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl.config import DataConfig
from rl.errors import DataError

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Prompt:
    """One prompt of the dataset, ready for the rollout engine."""

    index: int
    """Row index in the (filtered) dataset."""
    text: str
    """Prompt text after the chat template (what reward functions receive as `prompt`)."""
    token_ids: list[int]
    """Token ids of `text`."""
    columns: dict[str, Any]
    """All other dataset columns of the row (answer, data_source, ...), for reward functions."""


def load_rows(config: DataConfig, seed: int = 0):
    """Load the dataset named by `config.path` as a `datasets.Dataset`.

    Raises DataError naming the path, split and columns when it cannot be used.
    """
    import datasets

    datasets.disable_progress_bars()  # a few local rows: bars would only bury errors
    if config.path == "builtin:arithmetic":
        from rl.arithmetic_task import arithmetic_examples
        if config.split not in ("train", "test"):
            raise DataError(f"data.split = {config.split!r}: builtin:arithmetic has the splits train and test.")
        ds = datasets.Dataset.from_list(arithmetic_examples(seed=seed, split=config.split))
    elif config.path == "builtin:mixed":
        from rl.arithmetic_task import mixed_examples
        if config.split != "train":
            raise DataError(f"data.split = {config.split!r}: builtin:mixed has only the split train.")
        ds = datasets.Dataset.from_list(mixed_examples(seed=seed))
    else:
        path = Path(config.path)
        try:
            if path.is_file():
                fmt = _LOCAL_FORMATS.get(path.suffix)
                if fmt is None:
                    raise DataError(f"data.path = {config.path!r}: unsupported file type {path.suffix!r}. "
                                    f"Use one of {', '.join(_LOCAL_FORMATS)}.")
                ds = datasets.load_dataset(fmt, data_files={config.split: str(path)}, split=config.split)
            elif path.is_dir() or "/" in config.path or config.path.count(":") == 0:
                ds = datasets.load_dataset(config.path, split=config.split)
            else:
                raise DataError(f"data.path = {config.path!r} is neither a file, a directory nor a hub name.")
        except DataError:
            raise
        except Exception as e:  # datasets raises many types; the user needs the path and the cause
            raise DataError(f"data.path = {config.path!r} (split {config.split!r}) could not be loaded: "
                            f"{type(e).__name__}: {e}. Give a local .jsonl/.json/.parquet/.csv file, "
                            f"a dataset directory, `builtin:arithmetic` or `builtin:mixed`.") from None
    for key_name in ("prompt_key", "answer_key"):
        key = getattr(config, key_name)
        if key is not None and key not in ds.column_names:
            raise DataError(f"data.{key_name} = {key!r} is not a column of {config.path!r}. "
                            f"Columns that exist: {', '.join(ds.column_names)}. "
                            f"Set data.{key_name} to one of them.")
    return ds


class PromptSource:
    """Tokenized prompts drawn `prompts_per_step` at a time, epoch after epoch.

    The position (epoch, offset) is part of the checkpoint so a resumed run continues with
    the next unseen prompt in the same shuffled order.
    """

    def __init__(self, config: DataConfig, tokenizer, seed: int = 0):
        self.config = config
        self.seed = seed
        rows = load_rows(config, seed)
        self.prompts: list[Prompt] = []
        self.dropped_too_long = 0
        use_template = config.apply_chat_template and getattr(tokenizer, "chat_template", None)
        for i, row in enumerate(rows):
            text, messages = self._render(row[config.prompt_key], tokenizer, use_template, i)
            ids = tokenizer(text, add_special_tokens=not use_template)["input_ids"]
            if len(ids) > config.max_prompt_tokens:
                self.dropped_too_long += 1
                continue
            columns = {k: v for k, v in row.items() if k != config.prompt_key}
            columns["prompt_messages"] = messages  # the executor's mark of a conversational prompt
            if config.answer_key is not None and config.answer_key != "answer":
                columns.setdefault("answer", row[config.answer_key])
            self.prompts.append(Prompt(len(self.prompts), text, ids, columns))
        if len(self.prompts) < config.prompts_per_step:
            raise DataError(
                f"Only {len(self.prompts)} prompts of {config.path!r} fit data.max_prompt_tokens = "
                f"{config.max_prompt_tokens} ({self.dropped_too_long} were longer), fewer than "
                f"data.prompts_per_step = {config.prompts_per_step}. Raise max_prompt_tokens or lower prompts_per_step.")
        self.epoch = 0
        self.offset = 0
        self._order = self._epoch_order(0)

    def _render(self, value: Any, tokenizer, use_template: bool, row: int) -> tuple[str, list | None]:
        """(prompt text, its chat messages when the chat template rendered it, else None): reward
        functions in TRL's convention get conversational prompts as message lists."""
        if isinstance(value, str):
            messages = [{"role": "user", "content": value}]
        elif isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
            messages = list(value)
        else:
            raise DataError(f"Row {row} of column {self.config.prompt_key!r} is {type(value).__name__}: "
                            f"expected a string or a list of chat messages {{role, content}}.")
        if not use_template:
            return "\n".join(m["content"] for m in messages), None
        if self.config.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.config.system_prompt}] + messages
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), messages

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.config.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, size: int | None = None) -> list[Prompt]:
        """The next `size` (default prompts_per_step) prompts, wrapping into a new epoch."""
        size = size or self.config.prompts_per_step
        batch = []
        while len(batch) < size:
            if self.offset >= len(self._order):
                self.epoch += 1
                self.offset = 0
                self._order = self._epoch_order(self.epoch)
            batch.append(self.prompts[self._order[self.offset]])
            self.offset += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._epoch_order(self.epoch)
