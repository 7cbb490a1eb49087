"""Shared fixtures: tiny models built on the fly (no hub, seconds)."""

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
