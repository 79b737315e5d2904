"""Metrics sinks: JSON Lines (always), TensorBoard (always), W&B (when installed and asked for), and a
PNG plot of the curves users look at first; and the per-step performance figures the trainer logs
beside the algorithm's metrics (FLOPs, memory, throughput, length percentiles: README "Telemetry")."""

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


# --------------------------------------------------------------------------------------------------
# per-step performance figures
# --------------------------------------------------------------------------------------------------

GIB = 2**30


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(xs) - 1)
    return xs[low] + (xs[high] - xs[low]) * (pos - low)


def forward_flops(shape, seq_lens) -> float:
    """Model FLOPs of one forward over sequences of these lengths, by the planner's formula
    (plan.forward_flops_per_token: GEMMs per token plus causal attention growing with S), so that
    measured TFLOP/s and MFU are in the units `megatron-nft plan` predicts."""
    from megatron_nft.plan import forward_flops_per_token

    total = 0.0
    for s in seq_lens:
        gemm, attention = forward_flops_per_token(shape, s)
        total += s * (gemm + attention)
    return total


def peak_memory_bytes() -> int:
    """This process's peak: CUDA's max allocated since the last reset_peak_memory, else the peak
    resident set size of the process (Linux reports it in KiB; it cannot be reset)."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# torch.cuda.get_device_name() spellings of the planner's GPUs (plan.GPUS keys)
_GPU_NAMES = (("H200", "h200"), ("H100", "h100-80gb"), ("A100", "a100-80gb"))


def device_peak_tflops(override: float | None = None) -> float | None:
    """Dense BF16 peak TFLOP/s of this rank's accelerator: `override` when given, else the planner's
    table (plan.GPUS) for the CUDA device's name; None on CPU or an unknown GPU (no MFU then)."""
    if override:
        return float(override)
    import torch

    if not torch.cuda.is_available():
        return None
    from megatron_nft.plan import GPUS

    name = torch.cuda.get_device_name()
    return next((GPUS[key].bf16_tflops for marker, key in _GPU_NAMES if marker in name), None)


def actor_performance(shape, seq_lens, actor_seconds: float, world_size: int, peak_tflops: float | None) -> dict:
    """Per-GPU model TFLOP/s of the actor's step (one old-log-prob forward plus training's 3 x
    forward, the planner's and Megatron's count; recomputation not credited) and, with a peak, MFU."""
    if actor_seconds <= 0 or not seq_lens:
        return {}
    tflops = 4 * forward_flops(shape, seq_lens) / (actor_seconds * world_size) / 1e12
    out = {"perf/actor_tflops_per_gpu": tflops}
    if peak_tflops:
        out["perf/mfu"] = tflops / peak_tflops
    return out


def length_figures(lengths) -> dict:
    """Response length percentiles of the trained answers (stragglers: p90 and max against p50)."""
    if not lengths:
        return {}
    return {"perf/response_len_p50": percentile(lengths, 50), "perf/response_len_p90": percentile(lengths, 90),
            "perf/response_len_max": float(max(lengths))}


def progress_fields(metrics: dict, heldout_accuracy: float) -> dict:
    """The progress bar's short line: reward, held-out accuracy, seconds per step, generated tokens/s,
    and MFU (GPU) or TFLOP/s (CPU) when the step trained."""
    fields = {"reward": f"{metrics['rollout/reward']:.2f}", "heldout_acc": f"{heldout_accuracy:.2f}"}
    if "time/step_s" in metrics:
        fields["s/step"] = f"{metrics['time/step_s']:.1f}"
    if "perf/gen_tokens_per_s" in metrics:
        fields["gen_tok/s"] = f"{metrics['perf/gen_tokens_per_s']:.0f}"
    if "perf/mfu" in metrics:
        fields["mfu"] = f"{100 * metrics['perf/mfu']:.0f}%"
    elif "perf/actor_tflops_per_gpu" in metrics:
        fields["TFLOP/s"] = f"{metrics['perf/actor_tflops_per_gpu']:.3g}"
    return fields
