"""The architecture a memory plan needs (layers, widths, heads, vocabulary, parameter count):
from a model directory's config.json and safetensors headers, the Hugging Face cache, or the
built-in table of common models (BUILTIN_MODELS), never from the network."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from rl.errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    """What the memory plan needs of a decoder-only transformer (Llama / Qwen / SmolLM2 shape:
    RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    qk_norm: bool = False
    """Qwen3: an RMSNorm over head_dim on queries and keys."""
    qkv_bias: bool = False
    """Qwen2: biases on the q, k and v projections."""
    source: str = "built-in table"
    exact_params: int | None = None
    """Parameter count read from the checkpoint's safetensors headers, when local."""

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.module_shapes().values())

    def layer_params(self) -> int:
        """Linear weights + q/k/v biases + two RMSNorms (+ Qwen3's q/k norms)."""
        n = self.layer_linear_params() + 2 * self.hidden
        if self.qkv_bias:
            n += self.q_dim + 2 * self.kv_dim
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    def formula_params(self) -> int:
        """embeddings + layers + final norm (+ lm_head when not tied)."""
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied_embeddings else 2) + self.layers * self.layer_params() + self.hidden

    @property
    def params(self) -> int:
        return self.exact_params if self.exact_params is not None else self.formula_params()

    def matmul_params(self) -> int:
        """Weights that go through a matmul (cast to 16 bits under autocast): every linear
        layer and the head."""
        return self.layers * self.layer_linear_params() + self.vocab * self.hidden

    def lora_params(self, rank: int, targets: list[str]) -> int:
        shapes = self.module_shapes()
        return self.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """2 (K and V) x layers x kv_heads x head_dim x bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def describe(self) -> str:
        tie = "tied" if self.tied_embeddings else "untied"
        extra = (", q/k norm" if self.qk_norm else "") + (", qkv bias" if self.qkv_bias else "")
        return (f"{self.layers} layers, hidden {self.hidden}, {self.heads} heads / {self.kv_heads} KV heads "
                f"x {self.head_dim}, intermediate {self.intermediate}, vocab {self.vocab}, {tie} embeddings{extra}")


def _arch(name, layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, tied, qk_norm=False):
    return Architecture(name, layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, tied, qk_norm)


BUILTIN_MODELS: dict[str, Architecture] = {a.name: a for a in (
    # Qwen3 (config.json of each model): head_dim 128 whatever the hidden size; q/k norms.
    _arch("Qwen/Qwen3-0.6B", 28, 1024, 16, 8, 128, 3072, 151936, True, qk_norm=True),
    _arch("Qwen/Qwen3-1.7B", 28, 2048, 16, 8, 128, 6144, 151936, True, qk_norm=True),
    _arch("Qwen/Qwen3-4B", 36, 2560, 32, 8, 128, 9728, 151936, True, qk_norm=True),
    _arch("Qwen/Qwen3-8B", 36, 4096, 32, 8, 128, 12288, 151936, False, qk_norm=True),
    _arch("meta-llama/Llama-3.2-1B", 16, 2048, 32, 8, 64, 8192, 128256, True),
    _arch("meta-llama/Llama-3.2-3B", 28, 3072, 24, 8, 128, 8192, 128256, True),
    _arch("meta-llama/Llama-3.1-8B", 32, 4096, 32, 8, 128, 14336, 128256, False),
    _arch("HuggingFaceTB/SmolLM2-135M", 30, 576, 9, 3, 64, 1536, 49152, True),
    _arch("HuggingFaceTB/SmolLM2-360M", 32, 960, 15, 5, 64, 2560, 49152, True),
    _arch("HuggingFaceTB/SmolLM2-1.7B", 24, 2048, 32, 32, 64, 8192, 49152, True),
)}
"""Architectures of common models (the numbers of their Hugging Face config.json), looked up
by name without the organisation and without an -Instruct / -Base suffix."""


def _table_key(name: str) -> str:
    base = name.rsplit("/", 1)[-1].lower()
    for suffix in ("-instruct", "-base"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


def builtin_architecture(name: str) -> Architecture | None:
    key = _table_key(name.removeprefix("demo:"))
    for arch in BUILTIN_MODELS.values():
        if _table_key(arch.name) == key:
            return arch
    return None


def architecture_from_config(cfg: dict, name: str, source: str) -> Architecture:
    """An Architecture from a Hugging Face config.json (dict)."""
    cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        model_type = str(cfg.get("model_type", ""))
        return Architecture(
            name=name, layers=int(cfg["num_hidden_layers"]), hidden=hidden, heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=model_type.startswith("qwen3"),
            qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            source=source)
    except KeyError as e:
        raise ConfigError(f"model.path = {name!r}: its config.json ({source}) has no {e.args[0]!r}; rl.plan "
                          "knows decoder-only Llama/Qwen-shaped models only.") from None


def safetensors_params(model_dir: Path) -> int | None:
    """Parameters stored in a directory's *.safetensors files, read from their headers only."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, meta in header.items():
            if key != "__metadata__":
                total += math.prod(meta["shape"])
    return total


def find_architecture(model_path: str) -> Architecture:
    """The architecture of `model.path`, without a network: a local directory's config.json,
    the converted demo model, the Hugging Face cache, then BUILTIN_MODELS."""
    candidates: list[tuple[Path, str]] = []
    if model_path.startswith("demo:"):
        from rl.demo_model import DEMO_MODEL_NAME, default_cache_dir

        candidates.append((default_cache_dir() / DEMO_MODEL_NAME, "the converted demo model"))
    else:
        local = Path(os.path.expanduser(model_path))
        if local.is_dir():
            if not (local / "config.json").exists():
                raise ConfigError(f"model.path = {model_path!r} is a directory without config.json: point it "
                                  "at a Hugging Face model directory.")
            candidates.append((local, str(local / "config.json")))
        elif model_path.count("/") == 1 and not model_path.startswith((".", "/", "~")):
            try:
                from huggingface_hub import try_to_load_from_cache  # reads the cache only

                cached = try_to_load_from_cache(model_path, "config.json")
                if isinstance(cached, str):
                    candidates.append((Path(cached).parent, f"Hugging Face cache ({cached})"))
            except Exception:
                pass
    for directory, source in candidates:
        if (directory / "config.json").exists():
            arch = architecture_from_config(json.loads((directory / "config.json").read_text()), model_path, source)
            return dataclasses.replace(arch, exact_params=safetensors_params(directory))
    arch = builtin_architecture(model_path)
    if arch is not None:
        return dataclasses.replace(arch, source=f"built-in table ({arch.name})")
    names = ", ".join(BUILTIN_MODELS)
    raise ConfigError(f"model.path = {model_path!r}: rl.plan does not know its architecture (not a local "
                      f"directory, not in the Hugging Face cache, not in the built-in table). Point model.path "
                      f"at a local model directory with config.json, or use one of: {names}, "
                      "demo:SmolLM2-135M-Instruct.")
