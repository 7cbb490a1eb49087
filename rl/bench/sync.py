"""`python -m rl.bench sync`: weight sync seconds and GB/s per model size, next to memcpy.

For every model (tiny random Qwen2 models of growing size built offline, then
SmolLM2-135M-Instruct) a learner actor and a vLLM rollout actor start on this node, as in
training. Each repeat perturbs the learner's weights, syncs them and verifies the sync on a
canary prompt (the check training runs after every sync), timing:

  export   learner: fp32 -> bf16 cast into the flat buffer, written to Ray's object store
  load     rollout worker: zero-copy views of the buffer + vLLM `reload_weights`
           (+ tied lm_head repack) + prefix-cache reset
  total    driver wall time of export + load = `sync/seconds` in training; GB/s = bytes / total
  receive  the same object moved to the worker without loading it (transport alone)
  profile  one more flat load under cProfile: where the load's time goes (printed, in the JSON)

next to the `broadcast` path (rollout.weight_sync: broadcast, the GPU default: a bucketed
collective broadcast from the learner that the engine loads as it arrives; NCCL on GPU, gloo
here; export = the sender's cast + send, load = the engine's receive + load), the old path (a
dict of torch tensors pickled through the store, same reload) and the machine's memcpy
bandwidth measured in the same run (best of 5 `dst.copy_(src)` of --memcpy-mb MiB), the
physical bound of any same-node transport.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from rl.bench.table import print_table

DEFAULT_SIZES = "256x2,512x4,1024x8"
TRANSPORTS = ("flat", "broadcast", "legacy")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help=f"tiny models as HIDDENxLAYERS, comma-separated (default {DEFAULT_SIZES}; '' for none)")
    p.add_argument("--no-demo", action="store_true", help="skip SmolLM2-135M-Instruct")
    p.add_argument("--repeats", type=int, default=3, help="syncs per model (each verified)")
    p.add_argument("--no-legacy", action="store_true", help="skip the old dict-of-tensors path")
    p.add_argument("--no-broadcast", action="store_true", help="skip the collective broadcast path")
    p.add_argument("--bucket-mb", type=float, default=256.0, help="broadcast bucket size (rollout.weight_bucket_mb)")
    p.add_argument("--memcpy-mb", type=int, default=512, help="MiB copied to measure memcpy bandwidth")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--gpu-memory-utilization", type=float, default=0.1,
                   help="vLLM memory share (CPU: of RAM); weights + activations + a small KV cache")
    p.add_argument("--out-dir", default="outputs/bench/sync")


def memcpy_gbps(nbytes: int, repeats: int = 5) -> float:
    """Best-of-`repeats` bandwidth of one large tensor copy (bytes copied / second, 1e9)."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault in the pages before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def _actor_classes():
    import ray
    import torch

    from rl.learner import Learner
    from rollout.weights import as_named_tensors
    from rollout.worker import RolloutWorker

    @ray.remote
    class BenchLearner(Learner):
        def perturb(self, scale: float, seed: int) -> None:
            """New weights for every sync, so the canary check can tell old from new."""
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in self.updater.params:
                    p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())

    @ray.remote
    class BenchRollout(RolloutWorker):
        def ready(self) -> bool:
            return True

        def receive(self, weights) -> int:
            named = as_named_tensors(weights)
            return sum(t.numel() * t.element_size() for t in named.values())

        def profile_load(self, weights, top: int = 6) -> dict:
            """One load under cProfile: total seconds and the functions with the most own time
            (where vLLM's reload spends it, e.g. the CPU GEMM weight prepack)."""
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            self.load_weights(weights)
            prof.disable()
            own = [(func if file == "~" else f"{file.rsplit('/', 1)[-1]}:{func}", tt)
                   for (file, _, func), (_, _, tt, _, _) in pstats.Stats(prof).stats.items()]
            own.sort(key=lambda r: -r[1])
            return {"total_s": sum(tt for _, tt in own), "top": own[:top]}

    return BenchLearner, BenchRollout


def _canary_diff(learner, worker, canary_ids: list[int]) -> float:
    import ray

    # As the trainer's check: the engine scores the continuation teacher-forced (raw model).
    tokens, _ = ray.get(worker.canary.remote(canary_ids))
    rollout_lp = ray.get(worker.score.remote(canary_ids, tokens))
    learner_lp = ray.get(learner.score.remote(canary_ids, tokens))
    return max(abs(a - b) for a, b in zip(rollout_lp, learner_lp))


def _check_canary(learner, worker, canary_ids: list[int], tolerance: float, label: str) -> float:
    after = _canary_diff(learner, worker, canary_ids)
    if after > tolerance:  # recorded, not raised: the table shows it next to the other paths
        print(f"  {label}: canary max |diff| {after:.3g} > tolerance {tolerance}", flush=True)
    return after


def bench_model(name: str, path: str, args, classes) -> dict:
    import ray
    from transformers import AutoTokenizer

    from rl.actors import ACTOR_ENV, _actor_options
    from rl.config import Config, ModelConfig
    from rl.weight_sync import WeightSync

    BenchLearner, BenchRollout = classes
    opts = {**_actor_options(Config()), "runtime_env": {"env_vars": ACTOR_ENV}}  # one learner, one worker
    sections = Config(model=ModelConfig(path=path, dtype=args.dtype))
    learner = BenchLearner.options(**opts).remote(sections.model, sections.learner, sections.objective)
    worker = BenchRollout.options(**opts).remote(path, dtype=args.dtype, max_model_len=256,
                                                 gpu_memory_utilization=args.gpu_memory_utilization,
                                                 weight_broadcast=not args.no_broadcast)
    ray.get(worker.ready.remote())
    broadcast = None if args.no_broadcast else WeightSync("broadcast", [learner], [worker], int(args.bucket_mb * 2**20))
    canary_ids = AutoTokenizer.from_pretrained(path)("Count from one to ten:")["input_ids"]
    tolerance = 1e-3 if args.dtype == "float32" else 0.5  # trainer.sync_tolerance defaults
    rows = []
    try:
        paths = [("flat", "export_flat_weights")] + ([] if args.no_legacy else [("legacy", "export_weights")])
        paths += [] if broadcast is None else [("broadcast", None)]
        for rep in range(args.repeats):
            for transport, method in paths:
                ray.get(learner.perturb.remote(0.05, rep))
                before = _canary_diff(learner, worker, canary_ids)
                if method is None:  # broadcast: no object to time apart from its loading
                    m = broadcast.transfer(version=rep + 1)
                    rows.append({"transport": transport, "repeat": rep, "bytes": m["sync/bytes"],
                                 "export_s": m["sync/export_seconds"], "load_s": m["sync/load_seconds"],
                                 "total_s": m["sync/seconds"], "receive_s": None,
                                 "canary_diff_before": before,
                                 "canary_diff_after": _check_canary(learner, worker, canary_ids, tolerance,
                                                                    f"{name}/{transport}")})
                    continue
                t0 = time.perf_counter()
                ref = getattr(learner, method).remote()
                ray.wait([ref], fetch_local=False)
                export = time.perf_counter() - t0
                load = ray.get(worker.load_weights.remote(ref))
                total = time.perf_counter() - t0
                t1 = time.perf_counter()
                ray.get(worker.receive.remote(ref))
                receive = time.perf_counter() - t1
                after = _check_canary(learner, worker, canary_ids, tolerance, f"{name}/{transport}")
                rows.append({"transport": transport, "repeat": rep, "bytes": load["bytes"],
                             "export_s": export, "load_s": load["seconds"], "total_s": total,
                             "receive_s": receive, "canary_diff_before": before, "canary_diff_after": after})
                del ref
        try:  # a breakdown only: never lose the timed rows to it
            profile = ray.get(worker.profile_load.remote(learner.export_flat_weights.remote()))
        except Exception as e:  # noqa: BLE001
            profile = {"error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        ray.kill(worker)
        ray.kill(learner)
    return {"model": name, "rows": rows, "load_profile": profile}


def summarize(result: dict, memcpy: float) -> list[dict]:
    """Median over repeats per transport (the first repeat includes one-off allocations)."""
    out = []
    for transport in TRANSPORTS:
        rows = [r for r in result["rows"] if r["transport"] == transport]
        if not rows:
            continue
        med = {k: statistics.median(r[k] for r in rows)
               for k in ("export_s", "load_s", "total_s", "canary_diff_after")}
        nbytes = rows[0]["bytes"]
        gbps = nbytes / med["total_s"] / 1e9
        receive = [r["receive_s"] for r in rows if r["receive_s"] is not None]
        out.append({"model": result["model"], "transport": transport, "MB": nbytes / 1e6, **med,
                    "GB/s": gbps, "transport GB/s": nbytes / statistics.median(receive) / 1e9 if receive else None,
                    "% memcpy": 100 * gbps / memcpy,
                    "canary_diff_before": max(r["canary_diff_before"] for r in rows)})
    return out


def plot(summary: list[dict], memcpy: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for transport, marker in zip(TRANSPORTS, "osD"):
        rows = [r for r in summary if r["transport"] == transport]
        if rows:
            ax.plot([r["MB"] for r in rows], [r["GB/s"] for r in rows], marker=marker,
                    label=f"{transport}: export + vLLM reload")
    flat = [r for r in summary if r["transport"] == "flat"]
    if flat:
        ax.plot([r["MB"] for r in flat], [r["transport GB/s"] for r in flat], marker="^", ls=":",
                label="flat: object-store transport alone")
    ax.axhline(memcpy, color="k", ls="--", label=f"memcpy {memcpy:.1f} GB/s")
    ax.axhline(memcpy / 2, color="gray", ls=":", label="50% of memcpy (target)")
    ax.set_xscale("log")
    ax.set_xlabel("weights synced (MB)")
    ax.set_ylabel("GB/s")
    ax.set_title("Weight sync learner -> vLLM worker (CPU, same node)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    import ray

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    memcpy = memcpy_gbps(args.memcpy_mb << 20)
    print(f"memcpy: {memcpy:.2f} GB/s ({args.memcpy_mb} MiB tensor copy_, best of 5)")
    models: list[tuple[str, str]] = []
    tmp = tempfile.TemporaryDirectory(prefix="bench_sync_")
    from rl.tiny_model import build_tiny_model
    for spec in filter(None, args.sizes.split(",")):
        hidden, layers = (int(x) for x in spec.lower().split("x"))
        path = build_tiny_model(Path(tmp.name) / spec, hidden_size=hidden, num_layers=layers)
        models.append((f"tiny-{spec}", str(path)))
    if not args.no_demo:
        from rl.demo_model import prepare_demo_model
        models.append(("SmolLM2-135M", str(prepare_demo_model())))
    if not ray.is_initialized():
        from rl.bench.step import _workers_not_niced
        _workers_not_niced()
        ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    classes = _actor_classes()
    results, summary = [], []
    try:
        for name, path in models:
            print(f"[sync] {name} ...", flush=True)
            try:
                res = bench_model(name, path, args, classes)
            except Exception as e:  # e.g. vLLM refusing to start for lack of RAM: keep the others
                print(f"[sync] {name} failed: {type(e).__name__}: {str(e).splitlines()[-1][:300]}", flush=True)
                results.append({"model": name, "error": f"{type(e).__name__}: {e}"[:2000], "rows": []})
                continue
            results.append(res)
            summary += summarize(res, memcpy)
    finally:
        tmp.cleanup()
    columns = ["model", "transport", "MB", "export_s", "load_s", "total_s", "GB/s", "% memcpy",
               "transport GB/s", "canary_diff_before", "canary_diff_after"]
    print_table(summary, columns)
    for res in results:
        if res.get("load_profile", {}).get("top"):
            prof = res["load_profile"]
            print(f"{res['model']}: one flat load under cProfile, {prof['total_s']:.3f} s; most own time: "
                  + ", ".join(f"{name} {sec:.3f} s" for name, sec in prof["top"]))
    (out / "sync.json").write_text(json.dumps(
        {"memcpy_gbps": memcpy, "dtype": args.dtype, "summary": summary, "runs": results}, indent=2))
    plot(summary, memcpy, out / "sync.png")
    print(f"wrote {out / 'sync.json'} and {out / 'sync.png'}")
    return 0
