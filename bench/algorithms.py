"""The paper's algorithm table in miniature: every algorithm on the demo task, same base model, same
held-out problems, same budget, several seeds.

    python bench/algorithms.py                         # 6 algorithms x seeds 1 2 3, 40 steps each
    python bench/algorithms.py --algorithms nft rft --seeds 1 --steps 10     # a quick look
    python bench/algorithms.py --write-docs            # also append the table to docs/benchmarks.md

Method: one supervised warm-up (recipes/demo.yaml, its seed) gives the base model; every run starts
from it with `megatron-nft train --recipe recipes/demo.yaml model.hf_path=BASE algo.name=A run.seed=S`,
the train / held-out split fixed (data.seed) so that only the RL seed varies. Each algorithm runs with
its own settings (aggregation, dynamic sampling, over-long shaping: see config.AlgoConfig) and the
recipe's optimizer, batch and step count. Held-out accuracy is avg@k (k = --eval-samples) on the
recipe's held-out problems after the last step; "before" is the same measurement on the base model.
Runs are resumable: a finished run directory is read back, not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_nft.algorithms import ALGORITHMS  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}"


def build_base(recipe: Path, out: Path, overrides: list[str]) -> Path:
    """The warmed-up base model, built once (the demo's steps 1-4)."""
    base = out / "base"
    if (base / "config.json").is_file():
        return base
    code = (
        "import sys; from pathlib import Path; from megatron_nft.config import load_config; "
        "from megatron_nft.demo import build_base_model; "
        f"build_base_model(load_config({str(recipe)!r}, {overrides!r}), Path({str(base)!r}))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return base


def finished(run_dir: Path, steps: int) -> dict | None:
    """The final metrics of a complete run (its last step logged with an evaluation), else None."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last = next((r for r in reversed(rows) if r.get("step") == steps and r.get("eval/accuracy") is not None), None)
    first = next((r for r in rows if r.get("step") == 0), None)
    if last is None or first is None:
        return None
    return {"before": first["eval/accuracy"], "after": last["eval/accuracy"], "final": last, "rows": len(rows)}


def run_one(recipe: Path, base: Path, run_dir: Path, algorithm: str, seed: int, args) -> dict:
    done = finished(run_dir, args.steps)
    if done is not None:
        return {**done, "seconds": json.loads((run_dir / "bench.json").read_text())["seconds"]}
    overrides = [
        f"model.hf_path={base}", f"algo.name={algorithm}", f"run.seed={seed}", f"data.seed={args.data_seed}",
        f"run.dir={run_dir}", f"run.steps={args.steps}", "run.overwrite=true", "eval.every=0",
        f"eval.samples={args.eval_samples}", *args.overrides,
    ]
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "megatron_nft.cli", "train", "--recipe", str(recipe), "--quiet", *overrides]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    (run_dir / "bench.json").write_text(json.dumps({"seconds": seconds, "command": cmd}))
    done = finished(run_dir, args.steps)
    if done is None:
        raise RuntimeError(f"{run_dir}: the run ended without a final evaluation")
    return {**done, "seconds": seconds}


def table(results: dict, algorithms: list[str], seeds: list[int]) -> str:
    lines = [
        "| algorithm | held-out before | held-out after (mean ± std) | per seed | train reward, last step | s per run |",
        "|---|---|---|---|---|---|",
    ]
    for a in algorithms:
        runs = [results[(a, s)] for s in seeds]
        after = [100 * r["after"] for r in runs]
        before = statistics.mean(100 * r["before"] for r in runs)
        std = statistics.stdev(after) if len(after) > 1 else 0.0
        reward = statistics.mean(r["final"].get("rollout/reward", float("nan")) for r in runs)
        secs = statistics.mean(r["seconds"] for r in runs)
        per_seed = ", ".join(f"{x:.1f}" for x in after)
        lines.append(f"| {a} | {before:.1f}% | {statistics.mean(after):.1f} ± {std:.1f}% | {per_seed} | {reward:.2f} | {secs:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-samples", type=int, default=32, help="avg@k on the held-out problems")
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "demo.yaml")
    p.add_argument("--data-seed", type=int, default=1234, help="the train / held-out split (and the warm-up)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_algorithms")
    p.add_argument("--write-docs", action="store_true", help="append the table to docs/benchmarks.md")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every run")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = build_base(args.recipe, args.out, [f"run.seed={args.data_seed}", *args.overrides])
    results = {}
    for seed in args.seeds:
        for algorithm in args.algorithms:
            r = run_one(args.recipe, base, args.out / f"{algorithm}_seed{seed}", algorithm, seed, args)
            results[(algorithm, seed)] = r
            print(f"{algorithm:8s} seed {seed}: held-out {100 * r['before']:.1f}% -> {100 * r['after']:.1f}% ({r['seconds']:.0f} s)", flush=True)
    text = table(results, args.algorithms, args.seeds)
    header = (
        f"{date.today().isoformat()}, {machine()}: `python bench/algorithms.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + f"`; {args.steps} steps per run, seeds {', '.join(map(str, args.seeds))}, held-out avg@{args.eval_samples}, "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    print(header)
    print(text)
    (args.out / "table.md").write_text(header + "\n\n" + text + "\n")
    if args.write_docs:
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write("\n## The algorithm table in miniature (`bench/algorithms.py`)\n\n" + header + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
