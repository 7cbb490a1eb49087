"""Per-step metrics: metrics.jsonl, curves.png, and the trackers of `trainer.loggers`
(TensorBoard, Weights & Biases, MLflow); evaluation rows in eval.jsonl.

metrics.jsonl is always written (the other files and the resume logic read it). wandb and
mlflow are optional extras (`pip install 'rl-infinite[trackers]'`), imported only when chosen;
`check_loggers` (run by the config's TrainerConfig check, before Ray starts) turns an unknown
name or a tracker that is not installed into a ConfigError with the install command.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

# Panels of curves.png: (title, metric keys drawn in it).
CURVE_PANELS = (
    ("reward", ("reward/mean",)),
    ("response length (tokens)", ("response_length/mean", "response_length/max")),
    ("loss", ("loss",)),
    ("entropy", ("entropy",)),
    ("seconds per step", ("time/generate", "time/train", "time/sync", "time/step")),
    ("sync max |Δ log-prob|", ("sync/max_logprob_diff",)),
    ("MFU (of the measured peak)", ("perf/learner_mfu", "perf/rollout_mfu")),
    ("staleness (versions)", ("staleness/mean", "staleness/max")),
    ("held-out evaluation", ("eval/reward_mean", "eval/pass@1", "eval/pass@4")),
    ("rollout KV tokens", ("rollout/kv_budget_tokens", "rollout/engine_kv_tokens", "rollout/peak_kv_tokens")),
    ("rollout decode steps", ("rollout/decode_steps", "rollout/lower_bound_steps")),
    ("rollout preemptions", ("rollout/preemptions",)),
    ("length predictor MAE (tokens)", ("rollout/predictor_mae",)),
)

LOGGERS = ("jsonl", "tensorboard", "wandb", "mlflow")
"""Valid `trainer.loggers` names."""
DEFAULT_LOGGERS = ("jsonl", "tensorboard")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""Module each tracker imports (tensorboard is a project dependency; wandb and mlflow extras)."""


def check_loggers(loggers: Any) -> list[str]:
    """`trainer.loggers` checked and normalised: known names, each once, jsonl first (always on).

    ConfigError for an unknown name, or for a chosen tracker whose package is not installed
    (with the command that installs it). Nothing is imported here (importlib.util.find_spec).
    """
    from rl.errors import ConfigError

    if isinstance(loggers, str):
        loggers = [loggers]
    if not isinstance(loggers, (list, tuple)) or not all(isinstance(x, str) for x in loggers):
        raise ConfigError(f"trainer.loggers = {loggers!r} must be a list of names, e.g. [jsonl, tensorboard, wandb].")
    names = ["jsonl"] + [x.strip().lower() for x in loggers]
    unknown = [x for x in names if x not in LOGGERS]
    if unknown:
        raise ConfigError(f"trainer.loggers = {list(loggers)!r}: unknown tracker {unknown[0]!r}. "
                          f"Use any of {', '.join(LOGGERS)} (jsonl is always on).")
    out = list(dict.fromkeys(names))
    for name in out:
        module = _PACKAGES.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"trainer.loggers includes {name!r}, but the {module} package is not installed. "
                              f"Install it with `pip install 'rl-infinite[trackers]'` (or `pip install {module}`), "
                              f"or remove {name} from trainer.loggers.")
    return out


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and None as JSON text (tracker parameters)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


class MetricsLogger:
    """Appends one JSON object per step to metrics.jsonl, mirrors it to each chosen tracker,
    and redraws curves.png.

    Args:
        output_dir: the run's trainer.output_dir.
        loggers: trainer.loggers (jsonl is always on, whether listed or not).
        run_name: the run's name in wandb / mlflow (default: the output directory's name).
        config: the resolved config as a plain dict (rl.config.config_to_dict), recorded as the
            run's config / parameters. Never environment values.
        plot: redraw curves.png after every row.

    wandb: project `$WANDB_PROJECT` (default rl-infinite), files under `output_dir/wandb`
    (`WANDB_MODE=offline` works without an account). mlflow: `$MLFLOW_TRACKING_URI` when set,
    else a file store in `output_dir/mlruns`; experiment `$MLFLOW_EXPERIMENT_NAME` (default
    rl-infinite).
    """

    def __init__(self, output_dir: str | Path, loggers: list[str] | tuple[str, ...] = DEFAULT_LOGGERS,
                 run_name: str | None = None, config: dict | None = None, plot: bool = True):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "metrics.jsonl"
        self.eval_jsonl = self.dir / "eval.jsonl"
        self.plot = plot
        self.loggers = check_loggers(list(loggers))
        self.run_name = run_name or self.dir.resolve().name
        config = dict(config or {})
        self.tb = self.wandb_run = self.mlflow = None
        if "tensorboard" in self.loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
        if "wandb" in self.loggers:
            import wandb

            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rl-infinite"), name=self.run_name,
                                        config=config, dir=str(self.dir))
        if "mlflow" in self.loggers:
            self._start_mlflow(config)

    def _start_mlflow(self, config: dict) -> None:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow >= 3.7 refuses a file store unless told to accept it; it is the one
            # backend that needs nothing but a directory, so keep it for the default.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((self.dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "rl-infinite"))
        self.mlflow = mlflow
        self.mlflow_run = mlflow.start_run(run_name=self.run_name)
        params = flatten(config)
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            mlflow.log_params(dict(list(params.items())[i:i + 100]))

    @staticmethod
    def _scalars(row: dict) -> dict[str, float]:
        return {k: float(v) for k, v in row.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}

    def _trackers(self, step: int, scalars: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)
        if self.mlflow is not None:
            # MLflow keys: letters, digits, _ - . / and spaces.
            self.mlflow.log_metrics({_mlflow_key(k): v for k, v in scalars.items()}, step=step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._trackers(step, self._scalars(row))
        if self.plot:
            plot_curves(read_metrics(self.jsonl), self.dir / "curves.png")

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """One evaluation: a row of eval.jsonl, and `eval/<name>` in the trackers."""
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.eval_jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = self._scalars(row)
        self._trackers(step, {(k if k.startswith("eval/") else f"eval/{k}"): v for k, v in scalars.items()})

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint's step (metrics.jsonl and eval.jsonl),
        so each file has each step once."""
        for path in (self.jsonl, self.eval_jsonl):
            if path.exists():
                rows = [r for r in read_metrics(path) if r["step"] <= step]
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
        if self.mlflow is not None:
            self.mlflow.end_run()
            self.mlflow = None


def _mlflow_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


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
