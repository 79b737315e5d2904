"""SIGKILL of the trainer leaves no process of the project alive (#14 item 8).

A kill -9 (the OOM killer, Slurm after KillWait) runs no clean-up in the trainer: its grading workers,
its rollout server, the fork server behind the workers and megatron-core's checkpoint results manager
must go by themselves (parent_death.py, megatron_workarounds.results_queue_that_dies_with_us).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["warmup.steps=10", "data.n_train=200", "data.n_eval=4", "model.hidden_size=64", "model.num_layers=2",
        "model.intermediate_size=128", "rollout.prompts_per_step=4", "rollout.gen_prompts=8", "rollout.samples_per_prompt=4",
        "run.steps=50", "run.save_every=1", "eval.every=0", "reward.workers=2", "rollout.engine=local_http", "rollout.num_servers=1",
        "rollout.server_args=[--threads,1]"]


def _alive(processes) -> list[str]:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow
def test_sigkill_of_the_trainer_leaves_no_process_alive(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_nft.cli", "demo", "--quiet", f"run.dir={run}", *TINY],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    descendants = []
    try:
        deadline = time.monotonic() + 600
        saved = run / "checkpoints" / "step_000001" / "manifest.json"
        while not saved.is_file():  # training is under way and has saved once
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach its first step"
            time.sleep(0.2)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        kinds = " ".join(" ".join(p.cmdline()) for p in descendants)
        # what the trainer had started: the rollout server, the grading workers' fork server (and workers),
        # and the results-queue manager megatron-core's checkpoint writer starts on the first save
        assert "megatron_nft.rollout.http_server" in kinds and "forkserver" in kinds, kinds
        assert "multiprocessing.spawn" in kinds, kinds
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while _alive(descendants) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(descendants), f"alive 10 s after SIGKILL of the trainer: {_alive(descendants)}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in descendants:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.stderr.close()
