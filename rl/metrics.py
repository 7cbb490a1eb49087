"""Per-step metrics: metrics.jsonl, TensorBoard events and curves.png in the output directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

# Panels of curves.png: (title, metric keys drawn in it).
CURVE_PANELS = (
    ("reward", ("reward/mean",)),
    ("response length (tokens)", ("response_length/mean", "response_length/max")),
    ("loss", ("loss",)),
    ("entropy", ("entropy",)),
    ("seconds per step", ("time/generate", "time/train", "time/sync", "time/step")),
    ("sync max |Δ log-prob|", ("sync/max_logprob_diff",)),
)


class MetricsLogger:
    """Appends one JSON object per step and mirrors it to TensorBoard; redraws the curves."""

    def __init__(self, output_dir: str | Path, plot: bool = True):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "metrics.jsonl"
        self.plot = plot
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()
        if self.plot:
            plot_curves(read_metrics(self.jsonl), self.dir / "curves.png")

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint's step, so the file has each step once."""
        if self.jsonl.exists():
            rows = [r for r in read_metrics(self.jsonl) if r["step"] <= step]
            self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def close(self) -> None:
        self.tb.close()


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    return v


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(rows: list[dict], out: str | Path) -> None:
    """Draw the CURVE_PANELS that have data into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, keys) for t, keys in CURVE_PANELS if any(k in r for r in rows for k in keys)]
    if not panels:
        return
    cols = 3
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.2 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
