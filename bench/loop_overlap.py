"""Overlapped rollouts: the same runs in rollout.mode=sync and async, phase by phase.

    python bench/loop_overlap.py [--seeds 3] [--steps 8] [--recipe recipes/bench/overlap.yaml]

One warmed-up demo model (the demo's supervised warm-up, once), one local HTTP rollout server (the
`local_http` engine's server process: SGLang's API, deterministic sampling) and, per seed, one
training run in each mode with the same recipe, seed and steps, attached to that server
(rollout.urls). With two or more CPUs the server gets a core of its own (taskset) and one torch
thread; the trainer (one torch thread) and its grading worker are left to the scheduler: on a shared
core generation and training would only take turns and nothing could overlap.

Printed: each run's mean phase times over the steps after the first (the first step of an async run
generates its own rollout without overlap), the step-time ratio async/sync, the ideal ratio from the
sync run's own phases, max(G, A) / (G + A) with G = collection (generate + grade, time/rollout_s) and
A = actor work (old log-probs + train), the achieved saving as a share of the ideal saving min(G, A),
and the held-out accuracy after the last step per seed in both modes (the seed-to-seed spread of sync
is the yardstick for async's). The machine and its load are printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("time/step_s", "time/rollout_s", "time/generate_s", "time/grade_s", "time/old_logprobs_s", "time/train_s",
          "time/old_logprobs_ahead_s", "time/sync_s", "time/rollout_wait_s")


def build_base(recipe: Path, out: Path) -> None:
    from megatron_nft import runtime
    from megatron_nft.config import load_config
    from megatron_nft.demo import build_base_model

    runtime.init_process_group()
    build_base_model(load_config(recipe, [f"run.dir={out.parent / 'warmup'}"]), out, quiet=True)


def pinned(cpu: int | str | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []


def start_server(base: Path, port: int, cpu: int | None, log: Path) -> subprocess.Popen:
    from megatron_nft.rollout.servers import local_server_command

    cmd = local_server_command(str(base), port=port, threads=1, deterministic=True)
    proc = subprocess.Popen([*pinned(cpu), *cmd], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    import urllib.request

    deadline = time.time() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the rollout server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)


def train(recipe: Path, base: Path, url: str, run_dir: Path, mode: str, seed: int, steps: int, cpu: str | None) -> list[dict]:
    overrides = [f"model.hf_path={base}", f"run.dir={run_dir}", f"run.seed={seed}", f"run.steps={steps}",
                 "rollout.engine=local_http", f"rollout.urls=[{url}]", f"rollout.mode={mode}", "reward.workers=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [*pinned(cpu), sys.executable, "-m", "megatron_nft.cli", "train", "--quiet", "--recipe", str(recipe), *overrides]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{mode} seed {seed} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summary(rows: list[dict]) -> dict:
    steps = [r for r in rows if r["step"] > 1]  # the first step: no rollout ahead yet in async mode
    out = {k: statistics.mean(r.get(k, 0.0) for r in steps) for k in PHASES}
    out["accuracy"] = rows[-1].get("eval/accuracy")
    out["staleness"] = statistics.mean(r.get("rollout/staleness", 0) for r in steps)
    overlap = [r["perf/rollout_overlap"] for r in steps if "perf/rollout_overlap" in r]
    out["overlap"] = statistics.mean(overlap) if overlap else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "bench" / "overlap.yaml")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--port", type=int, default=31877)
    args = parser.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    # the server on a core of its own; the trainer (one torch thread) and its grading worker left to the
    # scheduler: grading runs after generation, when the server's core is free, so pinning the trainer
    # would put grading on the actor's core exactly when the overlap needs it elsewhere
    server_cpu = cpus[-1] if len(cpus) >= 2 else None
    trainer_cpus = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                        f"from bench.loop_overlap import build_base; from pathlib import Path; "
                        f"build_base(Path({str(args.recipe)!r}), Path({str(base)!r}))"],
                       check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"warm-up model: {time.perf_counter() - started:.0f} s")
        server = start_server(base, args.port, server_cpu, tmp / "server.log")
        url = f"http://127.0.0.1:{args.port}"
        results: dict[str, list[dict]] = {"sync": [], "async": []}
        try:
            for seed in range(1, args.seeds + 1):
                for mode in ("sync", "async"):
                    rows = train(args.recipe, base, url, tmp / f"{mode}{seed}", mode, seed, args.steps, trainer_cpus)
                    results[mode].append(summary(rows))
                    s = results[mode][-1]
                    print(f"seed {seed} {mode:5s}: step {s['time/step_s']:.2f} s, collect {s['time/rollout_s']:.2f} s, "
                          f"actor {s['time/old_logprobs_s'] + s['time/train_s']:.2f} s, accuracy {s['accuracy']:.3f}", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)

    def mean(mode, key):
        return statistics.mean(r[key] for r in results[mode])

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
          f"server on CPU {server_cpu}, trainer and grading unpinned; {args.seeds} seeds x {args.steps} steps, "
          f"means over steps 2..{args.steps}")
    print(f"{'phase (s)':24s} {'sync':>8s} {'async':>8s}")
    for key in PHASES:
        print(f"{key:24s} {mean('sync', key):8.3f} {mean('async', key):8.3f}")
    collect = mean("sync", "time/rollout_s")
    actor = mean("sync", "time/old_logprobs_s") + mean("sync", "time/train_s")
    step_sync, step_async = mean("sync", "time/step_s"), mean("async", "time/step_s")
    ideal_saving = min(collect, actor)
    print(f"step time async/sync: {step_async / step_sync:.3f} ({step_async:.2f} s vs {step_sync:.2f} s)")
    print(f"ideal ratio max(G, A)/(G + A): {max(collect, actor) / (collect + actor):.3f} "
          f"(G = {collect:.2f} s collection, A = {actor:.2f} s actor)")
    print(f"saving achieved: {step_sync - step_async:.2f} s a step of an ideal {ideal_saving:.2f} s "
          f"= {(step_sync - step_async) / ideal_saving:.0%}")
    print(f"mean staleness (async): {mean('async', 'staleness'):.2f}; rollout overlap (async): "
          f"{statistics.mean(r['overlap'] for r in results['async'] if r['overlap'] is not None):.0%}")
    for mode in ("sync", "async"):
        accs = [r["accuracy"] for r in results[mode]]
        print(f"held-out accuracy {mode:5s}: " + ", ".join(f"{a:.3f}" for a in accs)
              + f"  (mean {statistics.mean(accs):.3f}, spread {max(accs) - min(accs):.3f})")


if __name__ == "__main__":
    main()
