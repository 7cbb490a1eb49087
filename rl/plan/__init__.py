"""Plan a run before paying for GPUs: `python -m rl.plan CONFIG.yaml [--gpu H100-80GB] [--gpus N]`.

Validates the config (rl.config.load_config, the same checks as `python -m rl.train`) and
prints, without starting Ray, touching a GPU or contacting a model hub:

- the actor layout: rollout and learner workers and the GPU share of each, by the rule of
  rl/actors.py (`_actor_options`: one GPU each when there are enough, else equal fractions);
- per actor a memory plan: weights, gradients, optimizer state, activations of one
  micro-batch, the rollout engine's KV cache; the totals against the GPU's memory, with a
  warning (and the numbers) when a config will not fit.

The architecture comes from the model directory's config.json when it is local (or in the
Hugging Face cache), else from BUILTIN_MODELS. Every number is an estimate whose formula is
printed next to it; the learner's was compared with measured learners (tests/test_plan.py,
docs/CLUSTER.md).

    python -m rl.plan configs/gpu/qwen3_1.7b_1gpu.yaml --gpus 1
    python -m rl.plan configs/quickstart.yaml --gpu cpu
    python -m rl.plan configs/gpu/qwen3_1.7b_multi.yaml --gpu H200-141GB --json

The package, one job per module: rl/plan/architectures.py (the model's shape: config.json,
safetensors headers, BUILTIN_MODELS), rl/plan/devices.py (GPU memory table, byte units),
rl/plan/results.py (what a plan holds), rl/plan/activations.py (the learner's activation
memory), rl/plan/memory.py (plan_config: the layout and per-actor memory arithmetic),
rl/plan/cli.py (format_plan, main), rl/plan/__main__.py (`python -m rl.plan`).
"""

from rl.plan.activations import (_head_chunk_elements, activation_bytes_per_token_layer,  # noqa: F401
                                 learner_activation_items, resolved_layout)
from rl.plan.architectures import (BUILTIN_MODELS, Architecture, _arch, _table_key,  # noqa: F401
                                   architecture_from_config, builtin_architecture, find_architecture,
                                   safetensors_params)
from rl.plan.cli import format_plan, main  # noqa: F401
from rl.plan.devices import GIB, GPUS, MIB, _gib, gpu_memory  # noqa: F401
from rl.plan.memory import (CUDA_CONTEXT_BYTES, CUDA_GRAPH_BYTES, HEADROOM,  # noqa: F401
                            ROLLOUT_RUNTIME_BYTES, _dtype_bytes, _fix, plan_config)
from rl.plan.results import ActorPlan, Item, Plan  # noqa: F401
