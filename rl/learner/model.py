"""The trained model on one learner rank: loading, LoRA, the frozen reference, FSDP sharding,
and reading the full weights back (for sync and checkpoints).

Float32 master weights; forward/backward under bf16 autocast when `model.dtype` is 16-bit
(bf16 matmuls, fp32 accumulation and optimizer state).
"""

from __future__ import annotations

import contextlib

import torch

from rl.config import LearnerConfig, ModelConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class PolicyModel:
    """The policy (and, for KL objectives with full fine-tuning, a frozen reference copy).

    Args:
        model: the `model` section, with `path` resolved to a directory or hub name.
        learner: the `learner` section (attention kernel, gradient checkpointing, strategy).
        needs_ref: the objective has a KL term (a reference policy is kept).
        init_weights_path: full fine-tuning resume: load weights from this checkpoint instead.
    """

    def __init__(self, model: ModelConfig, learner: LearnerConfig, needs_ref: bool,
                 init_weights_path: str | None = None):
        from transformers import AutoModelForCausalLM

        self.config = model
        self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                       else torch.device("cpu"))
        self.dtype = DTYPES[model.dtype]
        """The rollout dtype and the autocast dtype (masters stay float32)."""
        self.lora = model.lora.rank > 0
        self.fsdp = False  # True once shard() ran (strategy fsdp, world_size > 1)
        attn = learner.attn_implementation
        if attn == "auto":
            attn = "sdpa" if self.device.type == "cuda" else "eager"
        net = AutoModelForCausalLM.from_pretrained(init_weights_path or model.path, dtype=torch.float32,
                                                   attn_implementation=attn).to(self.device)
        self.tie_word_embeddings = bool(getattr(net.config, "tie_word_embeddings", False))
        self.hf_config = net.config
        self.ref_model = None
        if self.lora:
            from peft import LoraConfig, get_peft_model

            lora = model.lora
            net = get_peft_model(net, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
        elif needs_ref:
            # The reference is the initial policy: the base model, even when resuming.
            self.ref_model = AutoModelForCausalLM.from_pretrained(
                model.path, dtype=torch.float32, attn_implementation=attn,
            ).to(self.device).eval().requires_grad_(False)
        if learner.gradient_checkpointing:
            net.gradient_checkpointing_enable()
        self.net = net
        self.pad_id = int(net.config.pad_token_id if net.config.pad_token_id is not None else 0)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.net.parameters() if p.requires_grad]

    def shard(self) -> None:
        """FSDP2 over the default process group (rl/fsdp.py); every rank at once."""
        from rl.fsdp import shard_model

        shard_model(self.net)
        self.fsdp = True

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def reference(self):
        """(reference policy, context to run it in): a frozen copy, or the LoRA model with its
        adapters disabled."""
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        return self.net, self.net.disable_adapter()

    def to_device(self, mb):
        """A micro-batch's tensors on this rank's device."""
        if self.device.type == "cpu":
            return mb
        for name, value in list(vars(mb).items()):
            if isinstance(value, torch.Tensor):
                setattr(mb, name, value.to(self.device))
        return mb

    # --- the full weights, under Hugging Face names ---------------------------------------

    def full_weights(self, gather: bool = True) -> dict[str, torch.Tensor]:
        """HF-named fp32 weights. fsdp: gathered from the shards (a collective: every rank
        calls it, in the same order), unless gather=False (DTensor shards, full shapes)."""
        state = self.net.state_dict()
        if self.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # same tensor as embed_tokens; saves bytes
        if self.fsdp and gather:
            from rl.fsdp import full_tensor

            return {k: full_tensor(v).detach() for k, v in state.items()}
        return {k: v.detach() for k, v in state.items()}

    def merged_lora_weights(self) -> dict[str, torch.Tensor]:
        """The base weights with the adapters merged in, in the rollout dtype."""
        self.net.merge_adapter()
        try:
            out = {}
            for name, tensor in self.net.get_base_model().state_dict().items():
                if "lora_" in name:
                    continue
                name = name.replace(".base_layer.", ".")
                if self.tie_word_embeddings and name == "lm_head.weight":
                    continue
                out[name] = tensor.detach().to(self.dtype).clone()
            return out
        finally:
            self.net.unmerge_adapter()

    def weights_to_send(self) -> dict[str, torch.Tensor]:
        """What the rollout engines load: fp32 masters (cast on the way), or merged LoRA."""
        return self.merged_lora_weights() if self.lora else self.full_weights()
