"""`megatron-nft report RUN_DIR [RUN_DIR ...]`: what runs spent their time on, from their metrics.jsonl.

Per run: each phase's mean and p90 seconds and share of the step, throughput (generated and trained
tokens/s, the actor's TFLOP/s per GPU and MFU), peak memory, weight-sync bandwidth, response-length
percentiles, stragglers and staleness where logged. Several runs: one table side by side (a scaling
study). A PNG of the time breakdown per step. With --plan, the planner's prediction for each run's own
config.yaml (plan.from_config, at the run's measured mean response length and generation rounds)
beside the measured phases, as ratios.
"""

from __future__ import annotations

import math
from pathlib import Path

from megatron_nft.errors import ConfigError
from megatron_nft.metrics import percentile, read_metrics

# (label, metrics key) in the order a step runs them; "other" is what step_s holds besides the named
# phases (broadcasting the batch, building tensors). In async mode (rollout.mode=async) generation and
# grading run beside the actor: the step holds only the wait for them and the old log-probs of the
# rollouts generated meanwhile, and the share of generation hidden is a figure.
PHASES = (
    ("generate", "time/generate_s"),
    ("grade", "time/grade_s"),
    ("waiting for rollouts", "time/rollout_wait_s"),
    ("old log-probs", "time/old_logprobs_s"),
    ("train", "time/train_s"),
    ("old log-probs (ahead)", "time/old_logprobs_ahead_s"),
    ("weight sync", "time/sync_s"),
    ("other", None),
    ("eval", "time/eval_s"),
    ("checkpoint", "time/checkpoint_s"),
)
NAMED_IN_STEP = ("time/generate_s", "time/grade_s", "time/old_logprobs_s", "time/train_s", "time/sync_s")
BESIDE_ASYNC_STEP = ("time/generate_s", "time/grade_s")
NAMED_IN_ASYNC_STEP = ("time/rollout_wait_s", "time/old_logprobs_s", "time/train_s", "time/old_logprobs_ahead_s",
                       "time/sync_s")
# (label, key, how over steps, format)
FIGURES = (
    ("generated tokens/s", "perf/gen_tokens_per_s", "mean", "{:,.0f}"),
    ("trained tokens/s", "perf/train_tokens_per_s", "mean", "{:,.0f}"),
    ("actor TFLOP/s per GPU", "perf/actor_tflops_per_gpu", "mean", "{:.4g}"),
    ("MFU", "perf/mfu", "mean", "{:.1%}"),
    ("peak memory GiB (max rank)", "perf/peak_mem_gib", "max", "{:.2f}"),
    ("weight sync GiB", "perf/sync_gib", "mean", "{:.3f}"),
    ("weight sync GB/s", "perf/sync_gb_per_s", "mean", "{:.2f}"),
    ("response length p50", "perf/response_len_p50", "mean", "{:.0f}"),
    ("response length p90", "perf/response_len_p90", "mean", "{:.0f}"),
    ("response length max", "perf/response_len_max", "max", "{:.0f}"),
    ("slowest request s", "time/slowest_request_s", "max", "{:.2f}"),
    ("rollout overlap (async)", "perf/rollout_overlap", "mean", "{:.0%}"),
)


def other_seconds(row: dict) -> float | None:
    if "time/step_s" not in row:
        return None
    named = NAMED_IN_ASYNC_STEP if "time/rollout_wait_s" in row else NAMED_IN_STEP
    return max(row["time/step_s"] - sum(row.get(k, 0.0) for k in named), 0.0)


def phase_seconds(row: dict, label: str, key: str | None) -> float | None:
    if key is None:
        return other_seconds(row)
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) else None


class Run:
    """One run directory's step rows (step >= 1) and, when present, its config.yaml."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        path = self.dir / "metrics.jsonl"
        if not path.is_file():
            raise ConfigError(f"{self.dir}: no metrics.jsonl (expected a run directory written by megatron-nft train)")
        self.rows = [r for r in read_metrics(path) if r.get("step", 0) >= 1 and "time/step_s" in r]
        if not self.rows:
            raise ConfigError(f"{path}: no training step logged yet (expected rows with time/step_s)")

    @property
    def name(self) -> str:
        return self.dir.name

    def values(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    def phase_values(self, label: str, key: str | None) -> list[float]:
        return [v for v in (phase_seconds(r, label, key) for r in self.rows) if v is not None]

    def figure(self, key: str, how: str) -> float | None:
        xs = self.values(key)
        if not xs:
            return None
        return max(xs) if how == "max" else sum(xs) / len(xs)

    @property
    def ranks(self) -> int:
        xs = self.values("perf/ranks")
        return int(xs[-1]) if xs else 1

    def staleness_keys(self) -> list[str]:
        return sorted({k for r in self.rows for k in r if "staleness" in k})


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def run_table(run: Run) -> str:
    step = _mean(run.values("time/step_s"))
    rows = []
    for label, key in PHASES:
        xs = run.phase_values(label, key)
        if xs:
            rows.append([label, f"{_mean(xs):.3f}", f"{percentile(xs, 90):.3f}", f"{_mean(xs) / step:.0%}"])
    rows.append(["step (without eval, checkpoint)", f"{step:.3f}", f"{percentile(run.values('time/step_s'), 90):.3f}", "100%"])
    text = [f"{run.dir}: {len(run.rows)} steps, {run.ranks} rank(s)", _table(["phase", "mean s", "p90 s", "of step"], rows)]
    figures = [[label, fmt.format(v)] for label, key, how, fmt in FIGURES if (v := run.figure(key, how)) is not None]
    for key in run.staleness_keys():
        xs = run.values(key)
        figures.append([key, f"mean {_mean(xs):.2f}, max {max(xs):.0f}"])
    if figures:
        text.append(_table(["figure", "value"], figures))
    return "\n\n".join(text)


def comparison_table(runs: list[Run]) -> str:
    """The runs side by side: each phase's mean seconds, then the figures."""
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r.dir) for r in runs]
    rows = []
    for label, key in PHASES:
        cells = [_mean(r.phase_values(label, key)) for r in runs]
        if any(c is not None for c in cells):
            rows.append([f"{label} s"] + ["-" if c is None else f"{c:.3f}" for c in cells])
    rows.append(["step s"] + [f"{_mean(r.values('time/step_s')):.3f}" for r in runs])
    for label, key, how, fmt in FIGURES:
        cells = [r.figure(key, how) for r in runs]
        if any(c is not None for c in cells):
            rows.append([label] + ["-" if c is None else fmt.format(c) for c in cells])
    return _table(["", *names], rows)


# --------------------------------------------------------------------------------------------------
# the planner beside the measurement
# --------------------------------------------------------------------------------------------------

# measured phase -> the planner's step-time lines it corresponds to (communication is inside train)
PLAN_LINES = (
    ("generate", "time/generate_s", ("rollout: decode",)),
    ("old log-probs", "time/old_logprobs_s", ("actor: old log-probs (forward)",)),
    ("train", "time/train_s", ("actor: training", "actor: communication")),
)


def predicted(run: Run, gpu: str, mfu: float | None):
    """The planner's LayoutPlan for the run's own config.yaml on its rank count, at the run's measured
    mean response length and generation rounds (what the planner otherwise assumes)."""
    import dataclasses

    from megatron_nft import plan
    from megatron_nft.config import load_config

    config = run.dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run.dir}: --plan needs the run's config.yaml (written when training begins)")
    cfg = load_config(config)
    settings = plan.Settings(gpu=plan.GPUS[gpu], mfu=plan.DEFAULT_MFU if mfu is None else mfu,
                             stated=frozenset({"mfu"}) if mfu is not None else frozenset())
    mean_response = _mean(run.values("rollout/response_length"))
    rounds = _mean(run.values("rollout/gen_rounds")) or 1.0
    assumptions = {"gen_rounds": rounds}
    if mean_response:
        assumptions["mean_response_len"] = min(max(mean_response, 1.0), cfg.rollout.max_new_tokens)
    inputs = plan.from_config(cfg, settings, **assumptions)
    layout = inputs.layout(run.ranks)
    return plan.plan_layout(inputs.shape, inputs.work, layout, dataclasses.replace(inputs.settings))


def plan_table(run: Run, gpu: str, mfu: float | None) -> str:
    from megatron_nft.plan import GPUS

    layout_plan = predicted(run, gpu, mfu)
    lines = {line.label: line.value for line in layout_plan.time}
    rows = []
    for label, key, plan_labels in PLAN_LINES:
        measured = _mean(run.values(key))
        want = sum(lines.get(x, 0.0) for x in plan_labels)
        rows.append([label, _fmt(want), _fmt(measured), _ratio(measured, want)])
    step = _mean([sum(r.get(k, 0.0) for _, k, _ in PLAN_LINES) for r in run.rows])
    rows.append(["these phases", _fmt(layout_plan.step_seconds), _fmt(step), _ratio(step, layout_plan.step_seconds)])
    head = (f"{run.dir}: measured vs `megatron-nft plan` for its config.yaml on {layout_plan.layout} "
            f"({GPUS[gpu].name}, MFU {mfu if mfu is not None else 'assumed'}); the planner models no grading, "
            f"weight sync or checkpoints")
    return head + "\n" + _table(["phase", "predicted s", "measured s", "measured/predicted"], rows)


def _fmt(x):
    return "-" if x is None else f"{x:.4g}"


def _ratio(measured, want):
    return "-" if measured is None or not want else f"{measured / want:.3g}x"


# --------------------------------------------------------------------------------------------------
# the PNG
# --------------------------------------------------------------------------------------------------


def plot_breakdown(runs: list[Run], out_png: Path) -> Path:
    """Stacked seconds per step, one panel per run, one colour per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.2 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        steps = [r["step"] for r in run.rows]
        bottom = [0.0] * len(steps)
        for label, key in PHASES:
            # in async steps generation and grading ran beside the stacked phases: not stacked
            ys = [0.0 if key in BESIDE_ASYNC_STEP and "time/rollout_wait_s" in r else phase_seconds(r, label, key) or 0.0
                  for r in run.rows]
            if any(ys):
                ax.bar(steps, ys, bottom=bottom, label=label)
                bottom = [b + y for b, y in zip(bottom, ys)]
        ax.set_title(f"{run.dir}: seconds per step")
        ax.set_xlabel("step")
        ax.set_ylabel("s")
        ax.legend(fontsize=7, ncol=4)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    from megatron_nft.plan import GPUS

    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (metrics.jsonl, config.yaml)")
    p.add_argument("--out", default=None, help="the time-breakdown PNG (default: RUN_DIR/time_breakdown.png of the first run)")
    p.add_argument("--plan", action="store_true", help="the planner's prediction for each run's config beside the measurement")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb", help="the GPU the plan assumes (default: %(default)s)")
    p.add_argument("--mfu", type=float, default=None, help="the MFU the plan assumes (default: the planner's)")


def run(args) -> str:
    """The report's text; writes the PNG. Bad input: a ConfigError naming the directory or flag."""
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu={args.mfu}: expected a fraction in (0, 1]")
    runs = [Run(Path(d)) for d in args.run_dirs]
    out = Path(args.out) if args.out else runs[0].dir / "time_breakdown.png"
    if out.suffix.lower() != ".png" or out.is_dir():
        raise ConfigError(f"--out {out}: expected a .png file path")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")
    parts = [run_table(r) for r in runs]
    if len(runs) > 1:
        parts.append("side by side (means over steps)\n" + comparison_table(runs))
    if args.plan:
        parts += [plan_table(r, args.gpu, args.mfu) for r in runs]
    plot_breakdown(runs, out)
    parts.append(f"time breakdown: {out}")
    return "\n\n".join(parts)
