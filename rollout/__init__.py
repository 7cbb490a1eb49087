"""Rollout workers: Ray actors around a step-driven vLLM engine, weight receiver, logits processors."""
