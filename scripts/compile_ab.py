"""A/B: torch.compile on the learner's model body, forward + backward of one padded micro-batch
(8 x ~256 tokens, bf16 autocast over float32 masters, as the learner runs it), on this CPU.
Run: .venv/bin/python scripts/compile_ab.py {eager|layers|model} (docs/BENCHMARKS.md).

eager: as training runs it; layers: each decoder layer compiled on its own (dynamic shapes);
model: the whole decoder stack compiled once (dynamic shapes). Prints the first two calls
(compilation included) and the median of four more at varied sequence lengths."""
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from rl.demo_model import prepare_demo_model

mode = sys.argv[1] if len(sys.argv) > 1 else "eager"
torch.manual_seed(0)
net = AutoModelForCausalLM.from_pretrained(str(prepare_demo_model()), dtype=torch.float32,
                                           attn_implementation="eager")
net.train()
if mode == "layers":
    for layer in net.model.layers:
        layer.compile(dynamic=True)
elif mode == "model":
    net.model.compile(dynamic=True)
elif mode != "eager":
    raise SystemExit(f"mode must be eager, layers or model, got {mode!r}")
rows = 8


def forward_backward(seq_len: int) -> None:
    ids = torch.randint(0, net.config.vocab_size, (rows, seq_len))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = net.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    hidden.float().pow(2).mean().backward()
    net.zero_grad(set_to_none=True)


t0 = time.perf_counter()
for n in (256, 200):
    forward_backward(n)
print(f"{mode}: first two calls (compilation included) {time.perf_counter() - t0:.1f} s", flush=True)
times = []
for n in (256, 224, 256, 240):
    t0 = time.perf_counter()
    forward_backward(n)
    times.append(time.perf_counter() - t0)
print(f"{mode}: calls {[round(t, 2) for t in times]} s, median {statistics.median(times):.2f} s")
