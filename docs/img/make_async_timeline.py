"""Draw docs/img/async_timeline.png: one step's timeline under max_staleness 0, 1, and 1 with
partial rollouts (schematic: generate 4 units, train 3, sync 1; one long sequence in step 2).

    python docs/img/make_async_timeline.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GEN, TRAIN, SYNC = "#4C72B0", "#DD8452", "#55A868"


def bars(ax, y, spans, color, labels):
    for (start, length), label in zip(spans, labels):
        ax.broken_barh([(start, length)], (y - 0.35, 0.7), facecolors=color, edgecolor="black", linewidth=0.5)
        ax.text(start + length / 2, y, label, ha="center", va="center", fontsize=8, color="white")


def main() -> None:
    fig, axes = plt.subplots(3, 1, figsize=(10, 6.2), sharex=True)
    # k = 0: generate b1, train, sync, generate b2 ... strictly one after another.
    ax = axes[0]
    bars(ax, 1, [(0, 4), (8, 4), (16, 4)], GEN, ["gen b1 (v0)", "gen b2 (v1)", "gen b3 (v2)"])
    bars(ax, 0, [(4, 3), (12, 3), (20, 3)], TRAIN, ["train b1", "train b2", "train b3"])
    bars(ax, 0.5, [(7, 1), (15, 1), (23, 1)], SYNC, ["v1", "v2", "v3"])
    ax.set_title("max_staleness 0: generate, train, sync, one after another")
    # k = 1: the next batch is generated while the learner trains; the load waits for it.
    ax = axes[1]
    bars(ax, 1, [(0, 4), (4, 4), (9, 4)], GEN, ["gen b1 (v0)", "gen b2 (v0)", "gen b3 (v1)"])
    bars(ax, 0, [(4, 3), (9, 3), (14, 3)], TRAIN, ["train b1", "train b2 (stale 1)", "train b3 (stale 1)"])
    bars(ax, 0.5, [(8, 1), (13, 1), (17, 1)], SYNC, ["v1", "v2", "v3"])
    ax.set_title("max_staleness 1: rollouts of the next step overlap training; the load queues behind them")
    # partial: a long sequence in gen b2 would hold the load back; the sync interrupts it and
    # the unfinished samples resume from their prefixes under v1.
    ax = axes[2]
    bars(ax, 1, [(0, 4), (4, 3), (8, 2), (10, 4)], GEN,
         ["gen b1 (v0)", "gen b2 (v0)", "resume", "gen b3 (v1)"])
    bars(ax, 0, [(4, 3), (10, 3), (14, 3)], TRAIN, ["train b1", "train b2", "train b3"])
    bars(ax, 0.5, [(7, 1), (13, 1), (17, 1)], SYNC, ["v1", "v2", "v3"])
    ax.set_title("max_staleness 1 + rollout.partial: the sync interrupts the rollout in flight; it resumes under v1")
    for ax in axes:
        ax.set_yticks([0, 0.5, 1], ["learner", "weights load", "rollout"])
        ax.set_ylim(-0.6, 1.6)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("time (schematic units: generate 4, train 3, sync 1)")
    fig.tight_layout()
    out = Path(__file__).with_name("async_timeline.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
