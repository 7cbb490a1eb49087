"""A/B: the rollout engine in a Ray actor that reserves no CPU (as rl.actors starts it), torch on
1 thread vs every core. Run: .venv/bin/python scripts/rollout_threads_ab.py (docs/BENCHMARKS.md)."""
import time

import ray

from rl.demo_model import prepare_demo_model
from rollout.records import SampleRequest
from rollout.worker import RolloutWorker

path = str(prepare_demo_model())
ray.init(num_cpus=2, include_dashboard=False)

@ray.remote(num_cpus=0)
class W(RolloutWorker):
    def threads(self):
        import torch
        return torch.get_num_threads()

from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(path)
reqs = [SampleRequest(i, tok(tok.apply_chat_template([{"role": "user", "content": f"What is {i+3} * {i+7}? Explain."}], add_generation_prompt=True, tokenize=False))["input_ids"]) for i in range(8)]
for threads in (1, 2, 1, 2):
    w = W.remote(path, dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.1, num_threads=threads)
    print("threads in actor:", ray.get(w.threads.remote()))
    ray.get(w.generate.remote(reqs[:2], group_size=2, max_new_tokens=16, seed=1))  # warm-up
    t0 = time.perf_counter()
    res = ray.get(w.generate.remote(reqs, group_size=8, max_new_tokens=128, seed=123))
    dt = time.perf_counter() - t0
    n = sum(len(s.response_ids) for s in res.samples)
    print(f"num_threads={threads}: {n} tokens in {dt:.2f} s = {n/dt:.0f} tok/s", flush=True)
    ray.kill(w); time.sleep(2)
ray.shutdown()
