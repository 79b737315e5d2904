"""A loop that survives faults: SIGTERM and SIGKILL mid-run, a corrupt checkpoint, a non-finite update.

The end-to-end test runs the demo (shrunken) in subprocesses, interrupts it twice (SIGTERM, which
checkpoints and exits; SIGKILL at a random step, which loses everything since the last checkpoint),
resumes each time, then corrupts the newest checkpoint and resumes once more: the metrics of every
step after each resume equal those of an uninterrupted run with the same seed, number for number.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_nft import checkpointing
from megatron_nft.algorithms import truncated_is_weights
from megatron_nft.cli import EXIT_STOPPED
from megatron_nft.metrics import truncate_metrics

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
TINY = [
    "warmup.steps=30", "warmup.lr=3e-3", "data.n_train=400", "data.n_eval=12", "data.max_operand=9",
    "model.hidden_size=64", "model.num_layers=2", "model.intermediate_size=128",
    "rollout.prompts_per_step=8", "rollout.gen_prompts=16", "rollout.samples_per_prompt=4",
    "algo.num_minibatches=2", "eval.samples=2", "eval.every=2", f"run.steps={STEPS}", "run.save_every=1",
]


def demo(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "megatron_nft.cli", "demo", "--quiet", f"run.dir={run_dir}", *TINY, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 900, returncode: int = 0, context: str = "") -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == returncode, context + err[-3000:]
    return err


def signal_dispositions(pid: int) -> str:
    """Which signals the process catches and ignores, per the kernel (for a failure's message)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return ""
    return " ".join(line for line in status if line.startswith(("SigCgt", "SigIgn", "SigBlk"))) + "\n"


def wait_for_checkpoint(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 900) -> None:
    target = run_dir / "checkpoints" / f"step_{step:06d}" / "manifest.json"
    deadline = time.time() + timeout
    while not target.is_file():
        assert proc.poll() is None, f"the run ended before writing checkpoint {step}: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"no checkpoint {step} after {timeout} s"
        time.sleep(0.05)


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    # wall-clock times and what is derived from them or from the process (perf/: tokens per second,
    # TFLOP/s, peak memory) differ between runs; everything else must not
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows}


MODES = {"sync": [], "async": ["rollout.mode=async", "rollout.max_staleness=1"]}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_interrupted_runs_resume_to_the_same_metrics(tmp_path, mode):
    """In async mode a checkpoint holds the answers already generated for the coming steps (and their
    old log-probs): a resumed run trains on exactly what the uninterrupted one does."""
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reference = demo(reference_dir, *MODES[mode])
    proc = demo(run_dir, *MODES[mode])  # both at once: two processes for two cores

    # 1. SIGTERM after checkpoint 1: the run finishes the step it is in, checkpoints it and exits cleanly
    wait_for_checkpoint(run_dir, 1, proc)
    handlers = signal_dispositions(proc.pid)
    proc.send_signal(signal.SIGTERM)
    err = finish(proc, returncode=EXIT_STOPPED, context=handlers)  # stopped, not finished: a distinct status
    assert "SIGTERM" in err and "run.resume=true" in err
    stopped = max(int(p.name.split("_")[1]) for p in checkpointing.checkpoint_dirs(run_dir))
    assert stopped < STEPS

    # 2. resume, then SIGKILL at a random later step: whatever it did after its last checkpoint is lost
    kill_after = random.Random(os.getpid()).randint(stopped + 1, STEPS - 1)
    proc = demo(run_dir, "run.resume=true", *MODES[mode])
    wait_for_checkpoint(run_dir, kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # a half-written checkpoint (a crash while saving) is never mistaken for a complete one
    (run_dir / "checkpoints" / f"step_{STEPS + 1:06d}.tmp" / "actor").mkdir(parents=True)

    # 3. resume to the end
    finish(demo(run_dir, "run.resume=true", *MODES[mode]))
    finish(reference)
    expected = metrics(reference_dir)
    assert sorted(expected) == list(range(STEPS + 1))
    got = metrics(run_dir)
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert got[step] == expected[step], f"step {step} (SIGTERM after {stopped}, SIGKILL after {kill_after})"
    if mode == "async":
        assert [expected[s]["rollout/staleness"] for s in range(1, STEPS + 1)] == [0] + [1] * (STEPS - 1)
        assert (checkpointing.checkpoint_dirs(run_dir)[-2] / "pending_rollouts.json").is_file()

    # 4. a corrupt newest checkpoint: resume falls back to the one before and recomputes the last step
    latest = checkpointing.checkpoint_dirs(run_dir)[-1]
    shard = max((p for p in (latest / "actor").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert "bytes" in checkpointing.problem(latest)
    err = finish(demo(run_dir, "run.resume=true", *MODES[mode]))
    assert f"skipping checkpoint {latest}" in err
    assert metrics(run_dir)[STEPS] == expected[STEPS]


# ---------------------------------------------------------------------------------------------------
# the pieces, fast


def test_manifest_records_sizes_and_problems_are_named(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step_000003"
    (ckpt / "actor").mkdir(parents=True)
    (ckpt / "actor" / "shard.distcp").write_bytes(b"x" * 100)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "rng_rank0.json").write_text("{}")
    files = {str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "crc32": checkpointing.crc32(p)}
             for p in ckpt.rglob("*") if p.is_file()}
    (ckpt / checkpointing.MANIFEST).write_text(json.dumps({"step": 3, "files": files}))
    (tmp_path / "checkpoints" / "step_000004.tmp").mkdir()  # half-written: ignored
    assert checkpointing.checkpoint_dirs(tmp_path) == [ckpt]
    assert checkpointing.problem(ckpt) is None and checkpointing.checksum_problem(ckpt) is None
    (ckpt / "actor" / "shard.distcp").write_bytes(b"y" * 100)  # same size, other bytes
    assert checkpointing.problem(ckpt) is None and "shard.distcp" in checkpointing.checksum_problem(ckpt)
    (ckpt / "actor" / "shard.distcp").write_bytes(b"x" * 10)
    assert "shard.distcp" in checkpointing.problem(ckpt) and "100" in checkpointing.problem(ckpt)
    (ckpt / "trainer_state.json").unlink()
    assert "trainer_state.json is missing" == checkpointing.problem(ckpt)


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s * 1.5}) + "\n" for s in range(6)))
    truncate_metrics(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]


def test_truncated_is_weights():
    actor = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    rollout = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    w = truncated_is_weights(actor, rollout, mask, cap=2.0)
    expected = torch.tensor([[min(torch.e ** 0.5, 2.0), torch.e ** -1.0, 1.0], [2.0, 1.0, 0.0]])
    torch.testing.assert_close(w, expected)


def test_nonfinite_loss_skips_the_update(tmp_path, monkeypatch):
    """A NaN in the batch (here an old log-prob) gives a NaN loss: no parameter moves, the step counter
    and the learning-rate schedule stay put, and the next finite batch updates normally."""
    from helpers import random_qwen2
    from megatron_nft.actor import Actor
    from megatron_nft.config import AlgoConfig, OptimConfig
    from megatron_nft.model.qwen2 import shape_from_hf

    config, model = random_qwen2()
    state = model.state_dict()
    actor = Actor(shape_from_hf(config), micro_batch_size=4, optim=OptimConfig(lr=1e-2, warmup_steps=2),
                  algo=AlgoConfig(name="grpo"), total_steps=10)
    actor.load_hf(lambda n: state[n])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (4, 8), generator=g)
    mask = torch.zeros(4, 8)
    mask[:, 2:7] = 1
    batch = {"tokens": tokens, "loss_mask": mask, "rewards": torch.tensor([1.0, 0, 1, 0]),
             "correct_rate": torch.full((4,), 0.5)}
    old, _ = actor.compute_logprobs({"tokens": tokens})
    poisoned = old.clone()
    poisoned[1, 3] = float("nan")
    before = {n: p.detach().clone() for n, p in actor.model.module.named_parameters()}
    lr_before = actor.optimizer.param_groups[0]["lr"]
    skipped = actor.train_step({**batch, "old_logprobs": poisoned}, group_size=4)  # GRPO's sample std needs K
    assert skipped["nonfinite"] and not skipped["update_ok"] and actor.steps == 0
    assert actor.optimizer.param_groups[0]["lr"] == lr_before
    for n, p in actor.model.module.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    assert actor.scheduler.num_steps == 0
    for step in (1, 2):  # the first update runs at the warm-up's initial lr of 0, the second moves
        ok = actor.train_step({**batch, "old_logprobs": old + 0.1}, group_size=4)
        assert not ok["nonfinite"] and ok["update_ok"] and actor.steps == step and actor.scheduler.num_steps == step
    assert any(not torch.equal(p.detach(), before[n]) for n, p in actor.model.module.named_parameters())

    # the gradient check walks the buffer in chunks: a NaN or an inf anywhere, the last element
    # included, is found whatever the chunk size
    from megatron_nft import actor as actor_module

    grads = actor.model.buffers[0].grad_data.view(-1)
    grads.zero_()
    for chunk in (actor_module.FINITE_CHECK_CHUNK, 7):
        monkeypatch.setattr(actor_module, "FINITE_CHECK_CHUNK", chunk)
        assert actor.grads_finite()
        for where, value in ((0, float("nan")), (grads.numel() // 2, float("inf")), (grads.numel() - 1, float("-inf"))):
            grads[where] = value
            assert not actor.grads_finite(), (chunk, where)
            grads[where] = 0.0


def test_actors_built_in_one_process_are_freed():
    """An actor lives until it is closed (close() or the end of its `with` block), and a closed one is
    freed: its DDP, gradient buffers and gloo file descriptors do not pile up (they did: megatron-core's
    gradient hooks form a cycle through C++ autograd nodes that gc cannot collect; close breaks it).
    Building another actor does not end an open one behind its owner's back."""
    import gc
    import os
    import weakref

    from helpers import random_qwen2
    from megatron_nft.actor import Actor
    from megatron_nft.model.qwen2 import shape_from_hf

    shape = shape_from_hf(random_qwen2()[0])
    fds, ddps = [], []
    for i in range(3):
        if i % 2:
            actor = Actor(shape, micro_batch_size=4)
            actor.close()
        else:
            with Actor(shape, micro_batch_size=4) as actor:
                pass
        ddps.append(weakref.ref(actor.model))
        del actor
        gc.collect()
        fds.append(len(os.listdir("/proc/self/fd")))
    assert [ref() for ref in ddps] == [None] * 3
    assert fds[2] <= fds[0] + 4, fds  # a leaked actor held ~80 descriptors

    with Actor(shape, micro_batch_size=4) as first:
        hooks = len(first.model.grad_accs)
        with Actor(shape, micro_batch_size=4):
            assert hooks > 0 and len(first.model.grad_accs) == hooks and not first.closed
    assert first.closed and first.model.grad_accs == []
    with pytest.raises(RuntimeError, match="closed"):  # not a step that silently reduces no gradient
        first.compute_logprobs({"tokens": torch.zeros(2, 4, dtype=torch.long)})
