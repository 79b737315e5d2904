"""Metrics sinks: JSON Lines (always), TensorBoard (always), W&B (when installed and asked for), and a
PNG plot of the curves users look at first."""

from __future__ import annotations

import json
import math
from pathlib import Path

PLOTTED = (
    ("rollout/reward", "reward (train rollouts)"),
    ("eval/accuracy", "held-out accuracy"),
    ("actor/entropy", "entropy (nats/token)"),
    ("rollout/response_length", "response length (tokens)"),
)


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool = True, wandb_project: str | None = None, append: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self._file = open(self.path, "a" if append else "w", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:  # tensorboard is a declared dependency; tolerate a trimmed install
            self._tb = None
        if wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_project, dir=str(run_dir))
            except ImportError:
                self._wandb = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}, allow_nan=True) + "\n")
        for key, value in clean.items():
            if isinstance(value, float) and math.isfinite(value):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keeps the rows up to `last_step` (a resumed run re-logs the steps after its checkpoint);
    rewritten to a temporary file and renamed."""
    path = Path(path)
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def plot_run(metrics_path: Path, out_png: Path) -> Path:
    """Reward, held-out accuracy, entropy and response length against step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, PLOTTED):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
