"""Infinite Sampling scheduling, pure Python: length prediction, FPTAS packing, SJF refill, simulator.

Imports neither torch, ray nor vllm: the rollout executor (rollout/) drives a vLLM engine step by
step and asks a policy from here which pending sequences to admit; the simulator runs the same
policy objects on known lengths. Entry points:

    make_policy(name, **kw)          full_group | naive_micro | continuous | length_aware
    make_predictor(name, **kw)       token_conditioned | oracle | constant
    simulate(policy, trace, slots, kv_budget_tokens) -> SimResult
    EngineKVModel(capacity, block)   vLLM's blocks, prefix sharing and preemption, for simulate

All policies side by side on a trace: `python -m rl.bench rollout --simulate` (rl/bench/rollout.py).
"""

from .base import SchedulingPolicy
from .engine_model import EngineKVModel, engine_kv_lower_bound_steps
from .knapsack import exact_knapsack, fptas_knapsack
from .policies import make_policy, policy_names
from .predictors import (
    ConstantPredictor,
    LengthPredictor,
    OracleLengthPredictor,
    TokenConditionedPredictor,
    make_predictor,
    predictor_names,
)
from .simulator import SimResult, kv_lower_bound_steps, lower_bound_steps, simulate
from .traces import Trace, load_trace, save_trace, synthetic_trace
from .types import Seq

__all__ = [
    "Seq",
    "SchedulingPolicy",
    "make_policy",
    "policy_names",
    "LengthPredictor",
    "TokenConditionedPredictor",
    "OracleLengthPredictor",
    "ConstantPredictor",
    "make_predictor",
    "predictor_names",
    "fptas_knapsack",
    "exact_knapsack",
    "simulate",
    "EngineKVModel",
    "engine_kv_lower_bound_steps",
    "SimResult",
    "lower_bound_steps",
    "kv_lower_bound_steps",
    "Trace",
    "synthetic_trace",
    "load_trace",
    "save_trace",
]
