"""Reward functions: registry, loading by import path or file, built-ins, and the executor."""
