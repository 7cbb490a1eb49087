"""Shared fixtures: tiny models built on the fly (no hub, seconds)."""

import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Qwen2 with tied embeddings and a BPE tokenizer with a chat template."""
    from rl.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_tied"), tie_word_embeddings=True))


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory):
    """The same with a separate lm_head (Llama architecture, to cover a second model family)."""
    from rl.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_untied"), tie_word_embeddings=False, arch="llama"))


@pytest.fixture(scope="session")
def make_learner():
    """A factory: Learner(model_path, "key=value" config overrides..., **Learner kwargs).

    Builds the learner from the config sections exactly as rl.actors.LearnerGroup does.
    """
    import dataclasses

    def build(model_path, *overrides, **kwargs):
        from rl.config import load_config
        from rl.learner import Learner

        c = load_config(None, list(overrides))
        kwargs.setdefault("num_threads", 1)
        return Learner(dataclasses.replace(c.model, path=str(model_path)), c.learner, c.objective,
                       temperature=c.rollout.temperature, seed=c.trainer.seed, **kwargs)

    return build


@pytest.fixture
def ray_tmp():
    # short: Ray's socket paths under it must stay below the 107-byte limit of AF_UNIX
    path = Path(tempfile.mkdtemp(prefix="rlp", dir="/tmp"))
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)
