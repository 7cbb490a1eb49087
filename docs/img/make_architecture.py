"""Draw docs/img/architecture.png: the actors of rl-infinite and the data flow of one step.

    .venv/bin/python docs/img/make_architecture.py

Every arrow is labelled with its step number and the file that owns it; docs/ARCHITECTURE.md
explains the numbers. Pure matplotlib (Agg backend), no project imports, deterministic output.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).with_name("architecture.png")

# colours per kind of process
DRIVER = "#dbe9f6"
ROLLOUT = "#e3f1df"
LEARNER = "#fbe5d6"
REWARD = "#f2e6f7"
SYNC = "#fff4c2"
INNER = "#ffffff"
EDGE = "#333333"
ARROW = "#1f4e79"


def box(ax, x, y, w, h, text, color, *, size=9, weight="normal", stack=0, va="center", dy=0.0):
    """A rounded box with centred text; `stack` > 0 draws shadow copies (N replicas)."""
    for k in range(stack, 0, -1):
        ax.add_patch(FancyBboxPatch((x + 0.12 * k, y - 0.12 * k), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                    fc=color, ec=EDGE, lw=0.8, alpha=0.6))
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                fc=color, ec=EDGE, lw=1.2))
    ty = y + h / 2 if va == "center" else y + h - 0.18
    ax.text(x + w / 2, ty + dy, text, ha="center", va=va, fontsize=size, weight=weight, linespacing=1.35)


def arrow(ax, start, end, label, *, rad=0.0, label_at=0.5, offset=(0.0, 0.0), color=ARROW, style="-|>", ls="-"):
    """Arrow from start to end with a label placed along the straight line between them."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=16, lw=1.8, color=color,
                                 connectionstyle=f"arc3,rad={rad}", linestyle=ls, shrinkA=2, shrinkB=2))
    lx = start[0] + (end[0] - start[0]) * label_at + offset[0]
    ly = start[1] + (end[1] - start[1]) * label_at + offset[1]
    ax.text(lx, ly, label, ha="center", va="center", fontsize=8, color=color,
            bbox=dict(boxstyle="round,pad=0.25", fc="white", ec=color, lw=0.8))


def main() -> None:
    fig, ax = plt.subplots(figsize=(16, 10))
    ax.set_xlim(0, 16)
    ax.set_ylim(0, 10)
    ax.axis("off")
    ax.text(8, 9.75, "rl-infinite: one training step", ha="center", va="center", fontsize=15, weight="bold")

    # ---- driver (top centre)
    box(ax, 4.6, 7.2, 6.8, 2.1,
        "Driver process\n"
        "rl/train.py: CLI, config (rl/config.py), preflight\n"
        "rl/trainer.py: the step loop\n"
        "prompts: rl/data.py    advantages: rl/objectives/\n"
        "metrics: rl/metrics.py",
        DRIVER, size=9.5, va="top", dy=0.0)

    # ---- reward workers (top right)
    box(ax, 12.6, 7.45, 3.0, 1.6,
        "Reward worker processes x K\n(rewards/worker.py)\nTRL / verl / plain functions\ntimeout -> kill + replace",
        REWARD, size=8.5, stack=2)

    # ---- rollout actors (left)
    box(ax, 0.3, 1.1, 5.0, 4.9, "RolloutActor x N   (Ray actor, rl/actors.py)\nrollout/worker.py",
        ROLLOUT, size=9.5, weight="bold", stack=2, va="top")
    box(ax, 0.65, 3.75, 4.3, 1.1,
        "Infinite Sampling scheduler\nscheduling/ (length_aware, continuous, ...)\ndecides admission under the KV budget",
        INNER, size=8.2)
    box(ax, 0.65, 2.35, 4.3, 1.05,
        "vLLM engine, driven step by step\nrollout/executor.py (add_request / step)",
        INNER, size=8.2)
    box(ax, 0.65, 1.35, 4.3, 0.7,
        "HAPO logits processor: rollout/hapo_temperature.py",
        INNER, size=7.8)
    arrow(ax, (2.8, 3.75), (2.8, 3.4), "", style="-|>")

    # ---- learner actors (right)
    box(ax, 10.6, 1.1, 5.0, 4.9, "LearnerActor x N   (Ray actor, rl/actors.py)\nrl/learner/__init__.py: Learner",
        LEARNER, size=9.5, weight="bold", stack=2, va="top")
    box(ax, 10.95, 3.95, 4.3, 0.9,
        "model: rl/learner/model.py\nreplicated | FSDP (rl/fsdp.py) | LoRA",
        INNER, size=8.2)
    box(ax, 10.95, 2.75, 4.3, 0.95,
        "update: rl/learner/update.py\nmicro-batches (rl/packing.py, rl/logprobs.py)\nforward/backward, optimizer step",
        INNER, size=8.0)
    box(ax, 10.95, 1.35, 4.3, 1.15,
        "export: rl/learner/export.py\ncheckpoint: rl/learner/checkpoint.py\nDP group: gloo (CPU) / NCCL (GPU)",
        INNER, size=8.0)

    # ---- weight sync + canary (bottom centre)
    box(ax, 5.9, 0.25, 4.2, 1.55,
        "Weight sync: rl/weight_sync.py\nobject_store: rollout/weights.py\nbroadcast: rollout/weight_broadcast.py",
        SYNC, size=8.5)
    box(ax, 6.15, 2.55, 3.7, 1.2,
        "Canary verification\nrl/trainer.py verify_sync\nengine log-probs == learner log-probs\nelse SyncError",
        SYNC, size=8.2)

    # ---- arrows of one step
    arrow(ax, (5.0, 7.2), (2.4, 6.05), "1 prompts -> requests\nrl/actors.py RolloutGroup.generate",
          rad=0.15, label_at=0.5, offset=(-1.0, 0.2))
    arrow(ax, (3.9, 6.05), (6.2, 7.2), "2 samples + rollout log-probs\nrollout/worker.py",
          rad=0.15, label_at=0.5, offset=(1.2, -0.35))
    arrow(ax, (11.4, 8.75), (12.6, 8.75), "3 completions\nrewards/executor.py", label_at=0.5, offset=(0.0, 0.45))
    arrow(ax, (12.6, 7.75), (11.4, 7.75), "4 rewards", label_at=0.5, offset=(0.0, -0.25))
    arrow(ax, (10.3, 7.2), (12.6, 6.05), "5 advantages -> shards\nrl/trainer.py, rl/packing.py\n"
          "LearnerGroup.update (rl/actors.py)", rad=-0.15, label_at=0.5, offset=(1.5, 0.0))
    arrow(ax, (10.6, 2.0), (10.1, 1.45), "", rad=0.0)
    ax.text(9.15, 2.17, "6 weights (rank 0)\nrl/learner/export.py", ha="center", va="center", fontsize=8,
            color=ARROW, bbox=dict(boxstyle="round,pad=0.25", fc="white", ec=ARROW, lw=0.8))
    arrow(ax, (5.9, 1.0), (5.3, 1.0), "7 load\nvLLM", label_at=0.5, offset=(0.0, 0.4))
    arrow(ax, (5.3, 3.1), (6.15, 3.1), "8 score\ncanary", label_at=0.5, offset=(0.0, 0.45), color="#7a5c00")
    arrow(ax, (10.6, 3.1), (9.85, 3.1), "8 score\ncanary", label_at=0.5, offset=(0.0, 0.45), color="#7a5c00")
    arrow(ax, (8.0, 3.75), (8.0, 7.2), "9 sync OK -> metrics, checkpoint\nrl/metrics.py, rl/learner/checkpoint.py",
          label_at=0.55, color="#7a5c00")
    # HAPO: the step's entropy statistics reach the rollout side with the next step's requests
    arrow(ax, (10.6, 4.6), (5.3, 4.6), "", color="#888888", ls="--")
    ax.text(8.0, 4.95, "HAPO only: this step's entropy statistics\ngo out with the next step's requests",
            ha="center", va="center", fontsize=7.5, color="#555555", style="italic",
            bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="none"))

    ax.text(0.3, 0.05, "Numbers = order within one step. Boxes with shadows are replicated actors/processes.",
            fontsize=8, color="#555555")
    fig.savefig(OUT, dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    print(OUT)


if __name__ == "__main__":
    main()
