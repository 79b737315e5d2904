"""A short demo-recipe run gives the recorded metrics, every value, every step, on 1 rank and on 2.

The numbers in tests/data/recorded_run.json were produced by this test's `--record` mode on the code
before the trainer, the actor and the algorithms were restructured into components (issue #17): a
restructuring that changes any number changed behaviour. Wall-clock times and the performance
telemetry (time/, perf/) are left out. Each run
uses one thread per rank (a thread count changes float reduction order).

    python tests/test_recorded_run.py --record     # rewrite the recording (only when behaviour changes on purpose)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECORDING = ROOT / "tests" / "data" / "recorded_run.json"
OVERRIDES = [
    "warmup.steps=80", "warmup.lr=3e-3", "data.n_train=400", "data.n_eval=12", "data.max_operand=9",
    "model.hidden_size=64", "model.num_layers=2", "model.intermediate_size=128",
    "rollout.prompts_per_step=8", "rollout.gen_prompts=16", "rollout.samples_per_prompt=4",
    "algo.num_minibatches=2", "eval.samples=2", "eval.every=3", "run.steps=6", "run.save_every=3", "reward.workers=1",
]
LAYOUTS = {"1 rank": 1, "2 ranks (DP=2)": 2}


def _run(rank, world_size, run_dir):
    from megatron_nft.config import load_config
    from megatron_nft.demo import run_demo

    run_demo(load_config(ROOT / "recipes" / "demo.yaml", [*OVERRIDES, f"run.dir={run_dir}"]), quiet=True)
    if rank != 0:
        return None
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    # time/ and perf/ (tokens/s, TFLOP/s, memory, length percentiles: telemetry added after the
    # recording, not behaviour) are left out
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))} for row in rows]


def run_layouts(tmp: Path) -> dict:
    from megatron_nft.testing import run_distributed

    return {label: run_distributed(_run, world, str(tmp / f"run{world}"))[0] for label, world in LAYOUTS.items()}


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


@pytest.mark.slow
def test_demo_run_matches_the_recorded_metrics(tmp_path):
    recorded = json.loads(RECORDING.read_text())
    got = run_layouts(tmp_path)
    for label in LAYOUTS:
        want, have = recorded[label], got[label]
        assert [r["step"] for r in have] == [r["step"] for r in want], label
        for w, h in zip(want, have):
            assert sorted(h) == sorted(w), f"{label} step {w['step']}: metric names changed"
            diff = {k: (w[k], h[k]) for k in w if not _same(w[k], h[k])}
            assert not diff, f"{label} step {w['step']}: {diff}"


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = run_layouts(Path(tmp))
    RECORDING.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RECORDING}: " + ", ".join(f"{k}: {len(v)} steps" for k, v in result.items()))
