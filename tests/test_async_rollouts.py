"""Overlapped rollouts (rollout.mode=async, megatron_nft/async_rollouts.py).

- With max_staleness 0 the async machinery runs the sync path's computation: the recorded sync run's
  metrics (tests/data/recorded_run.json), every value, on 1 rank.
- With max_staleness 1 on 2 ranks (DP=2) each step trains on answers sampled one version earlier,
  and π_old is that version's: the actor's old log-probs match the engine's (which sampled with it)
  as closely as in sync mode, where they would be a training step apart if π_old were the current
  weights' (the test measures that gap too, so it can tell the two apart).
- The actor's weight snapshot: log-probs under a swapped-in snapshot equal those computed before the
  weights moved, bit for bit, and the weights come back bit for bit (TP=2 on 2 ranks).
SIGKILL + resume in async mode: tests/test_resilience.py runs its interrupted-run test in both modes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.test_recorded_run import OVERRIDES, RECORDING, ROOT, _same

ASYNC_KEYS = ("rollout/staleness",)


def _async_run(rank, world_size, run_dir, extra):
    from megatron_nft.config import load_config
    from megatron_nft.demo import run_demo

    run_demo(load_config(ROOT / "recipes" / "demo.yaml", [*OVERRIDES, f"run.dir={run_dir}", *extra]), quiet=True)
    if rank != 0:
        return None
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))} for row in rows]


@pytest.mark.slow
def test_staleness_zero_gives_the_sync_runs_metrics(tmp_path):
    from megatron_nft.testing import run_distributed

    want = json.loads(RECORDING.read_text())["1 rank"]
    have = run_distributed(_async_run, 1, str(tmp_path / "run"), ["rollout.mode=async", "rollout.max_staleness=0"])[0]
    assert [r["step"] for r in have] == [r["step"] for r in want]
    for w, h in zip(want, have):
        if w["step"] > 0:
            assert h["rollout/staleness"] == 0
        assert sorted(k for k in h if k not in ASYNC_KEYS) == sorted(w), f"step {w['step']}: metric names differ"
        diff = {k: (w[k], h[k]) for k in w if not _same(w[k], h[k])}
        assert not diff, f"step {w['step']}: {diff}"


@pytest.mark.slow
def test_one_step_stale_answers_train_against_the_policy_that_sampled_them(tmp_path):
    from megatron_nft.testing import run_distributed

    rows = run_distributed(_async_run, 2, str(tmp_path / "run"), ["rollout.mode=async", "rollout.max_staleness=1"])[0]
    steps = [r for r in rows if r["step"] > 0]
    assert [r["rollout/staleness"] for r in steps] == [0] + [1] * (len(steps) - 1)
    # π_old from the sampling version: the actor and the engine (same weights, other kernels) agree as in
    # the recorded sync run (~2.5e-7); the weights one training step later differ by far more
    sync = [r["actor/rollout_logprob_abs_diff"] for r in json.loads(RECORDING.read_text())["2 ranks (DP=2)"] if r["step"]]
    assert max(r["actor/rollout_logprob_abs_diff"] for r in steps) < 4 * max(sync)
    assert all(math.isfinite(r["actor/loss"]) for r in steps)
    assert rows[-1]["eval/accuracy"] is not None


def _snapshot_check(rank, world_size):
    from megatron_nft.actor import Actor
    from megatron_nft.config import AlgoConfig, OptimConfig
    from megatron_nft.model.qwen2 import Qwen2Shape

    shape = Qwen2Shape(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=64,
                       tie_word_embeddings=False)
    actor = Actor(shape, tp=2, micro_batch_size=2, optim=OptimConfig(lr=1e-2, warmup_steps=0),
                  algo=AlgoConfig(name="nft"), seed=3)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (4, 24), generator=g)
    mask = torch.zeros(4, 24)
    mask[:, 8:23] = 1
    batch = {"tokens": tokens, "loss_mask": mask}
    before, _ = actor.compute_logprobs(batch)
    snapshot = actor.weights_snapshot()
    train = {**batch, "old_logprobs": before, "rewards": torch.tensor([1.0, 0.0, 1.0, 0.0]),
             "correct_rate": torch.full((4,), 0.5)}
    actor.train_step(train, group_size=2)
    moved = [p.detach().clone() for p in actor.model.parameters()]
    after, _ = actor.compute_logprobs(batch)
    with actor.weights_swapped(snapshot):
        under_snapshot, _ = actor.compute_logprobs(batch)
    back = all(torch.equal(p, q) for p, q in zip(actor.model.parameters(), moved))
    again, _ = actor.compute_logprobs(batch)
    actor.close()
    return {"same_as_before": torch.equal(under_snapshot, before), "moved": (after - before).abs().max().item(),
            "weights_back": back, "same_after": torch.equal(again, after)}


@pytest.mark.slow
def test_log_probs_under_a_weight_snapshot_are_the_old_versions(tmp_path):
    from megatron_nft.testing import run_distributed

    for result in run_distributed(_snapshot_check, 2):
        assert result["moved"] > 1e-4  # the training step changed the log-probs
        assert result["same_as_before"] and result["weights_back"] and result["same_after"], result
