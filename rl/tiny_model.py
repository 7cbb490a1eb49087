"""Build a tiny random causal LM and a tokenizer, fully offline, in seconds.

Tests and smoke benchmarks need a model that vLLM and transformers both load, without a
model hub. This writes a Qwen2 (or Llama) checkpoint of a few hundred thousand parameters
plus a byte-level BPE tokenizer trained on the fly with `tokenizers`, with a chat template,
in Hugging Face format.

    python -m rl.tiny_model OUT_DIR [--untied] [--arch llama]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# Special tokens in the ChatML form that Qwen and SmolLM2 use, so prompts built by the
# chat-template path look like the real models' prompts.
IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _training_corpus(num_lines: int = 2000, seed: int = 0) -> list[str]:
    """Arithmetic questions, digits and common words: what the tests' prompts contain."""
    rng = random.Random(seed)
    words = ("what is the answer sum of and plus minus times equals question please "
             "compute give only number think step by a an to user assistant system").split()
    lines = []
    for _ in range(num_lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        lines.append(f"What is {a} {op} {b}? " + " ".join(rng.choices(words, k=6)))
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(
    out_dir: str | Path,
    tie_word_embeddings: bool = True,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Write a random tiny model + tokenizer to `out_dir` (fp32 safetensors) and return it.

    head_dim is 32 because vLLM's CPU attention supports only a fixed list of head sizes.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=max(1, hidden_size // 64),
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )
    config = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger-than-default init so that sampled continuations are diverse, not one token.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--untied", action="store_true", help="separate lm_head weights")
    parser.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    args = parser.parse_args()
    path = build_tiny_model(args.out_dir, tie_word_embeddings=not args.untied, arch=args.arch)
    print(path)


if __name__ == "__main__":
    main()
