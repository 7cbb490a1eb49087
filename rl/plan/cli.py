"""The command line of `python -m rl.plan`: load and validate the config, plan it, print the
plan as text (`format_plan`) or JSON."""

from __future__ import annotations

import argparse
import json
import sys

from rl.errors import UserError
from rl.plan.devices import GPUS, _gib
from rl.plan.memory import HEADROOM, plan_config
from rl.plan.results import Plan


def format_plan(plan: Plan) -> str:
    m = plan.model
    lines = [f"plan: {plan.config_path or '(config)'} on "
             + (f"this machine's RAM ({_gib(plan.device_bytes)})" if plan.device == "cpu"
                else f"{plan.gpus} x {plan.device} ({_gib(plan.device_bytes)} each)"),
             f"model: {m.name}: {m.params / 1e9:.3f} B parameters "
             f"({'counted in its safetensors' if m.exact_params is not None else 'from the architecture'}); "
             f"{m.describe()} [{m.source}]",
             f"layout: {plan.layout}", ""]
    for actor in (plan.rollout, plan.learner):
        share = f", {actor.gpu_share:.3g} GPU each" if plan.device != "cpu" else ""
        lines.append(f"{actor.role} actor x{actor.count}{share}: {_gib(actor.total)} each")
        width = max(len(i.label) for i in actor.items)
        for i in actor.items:
            lines.append(f"  {i.label:<{width}}  {_gib(i.bytes):>11}   {i.formula}")
        for note in actor.notes:
            lines.append(f"  note: {note}")
        lines.append("")
    what = " + ".join(f"{name} {_gib(b)}" for name, b in plan.per_device)
    where = "this machine" if plan.device == "cpu" else "the fullest GPU"
    free = plan.device_bytes - plan.device_total
    verdict = ("DOES NOT FIT" if free < 0 else "fits, but tight" if free < HEADROOM * plan.device_bytes else "fits")
    lines.append(f"{where}: {what} = {_gib(plan.device_total)} of {_gib(plan.device_bytes)}: {verdict}"
                 + (f" ({_gib(free)} free)" if free >= 0 else f" ({_gib(-free)} over)"))
    for w in plan.warnings:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from rl import plan as package

    parser = argparse.ArgumentParser(prog="python -m rl.plan", description=package.__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML config, as for python -m rl.train")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--gpu", default="H100-80GB", help=f"one of {', '.join(GPUS)}, cpu (default H100-80GB)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs in the cluster (default: one per rollout and learner worker)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_intermixed_args(argv)
    from rl.config import load_config

    try:
        config = load_config(args.config, args.overrides)
        plan = plan_config(config, args.gpu, args.gpus, config_path=args.config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan))
    return 0
