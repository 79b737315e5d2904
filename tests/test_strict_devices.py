"""The CPU world as strict as the GPU one: collectives and the devices of their tensors, and ranks that
wait for rank 0's rollout longer than a device collective's timeout.

On GPUs the default group is NCCL: it refuses CPU tensors, and its watchdog ends a collective that
waits longer than the group's timeout. On CPU the default group is gloo, which accepts anything; the
strict device mode (megatron_nft.strict_devices, on in every run_distributed test) restores the first
rule, and the tests here shrink the default group's timeout to restore the second.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path

import pytest
import torch

from megatron_nft.testing import run_distributed

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_nft"

# The stop flag as trainer.StopRequested.agreed computed it before: a host tensor on the default group
# (NCCL on GPUs: "No backend type associated with device type cpu" at the end of every first step).
OLD_AGREED = """
import torch, torch.distributed as dist
def agreed(requested):
    flag = torch.tensor([1.0 if requested else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
"""


def _project_function(source: str, name: str):
    """Compiles `source` as if it were a file of the package, so the strict mode checks its collectives."""
    namespace: dict = {}
    exec(compile(source, str(PACKAGE / "_strict_devices_probe.py"), "exec"), namespace)
    return namespace[name]


def _rules_worker(rank, world_size):
    import torch.distributed as dist

    from megatron_nft import runtime
    from megatron_nft.strict_devices import ACCELERATOR, HOST, StrictDeviceError, home
    from megatron_nft.trainer import StopRequested

    out = {}
    # a default-group timeout far below the time rank 0 spends before the broadcast
    runtime.init_process_group(timeout=datetime.timedelta(seconds=2))

    # homes: what the GPU run would place where
    x = torch.tensor([1.0])
    y = torch.ones(2, device=runtime.device())
    out["homes"] = (home(x), home(x.float() * 2), home(y), home(y + 1), home(y.cpu()), home(x.to(runtime.device())),
                    home(torch.tensor([y.sum().item()])))
    assert out["homes"] == (HOST, HOST, ACCELERATOR, ACCELERATOR, HOST, ACCELERATOR, HOST), out["homes"]

    # the old stop flag fails here as it would on NCCL; the new one agrees across ranks
    old_agreed = _project_function(OLD_AGREED, "agreed")
    try:
        old_agreed(rank == 1)
        out["old_agreed"] = "passed"
    except StrictDeviceError as e:
        out["old_agreed"] = str(e)
    stop = StopRequested()
    stop.requested = rank == 1
    out["new_agreed"] = stop.agreed()

    # accelerator tensors on the default group and host tensors on the control group are both fine
    probe = _project_function(
        "import torch, torch.distributed as dist\n"
        "def reduce(t, group=None):\n    dist.all_reduce(t, group=group)\n    return t.tolist()\n", "reduce")
    out["accelerator_sum"] = probe(torch.ones(1, device=runtime.device()))
    out["host_on_control"] = probe(torch.ones(1), runtime.control_group())

    # rank 0 "generates" for longer than the default group's timeout: the broadcast waits on the
    # control group (gloo, no watchdog), so the other rank survives
    if rank == 0:
        time.sleep(5)
    out["broadcast"] = runtime.broadcast_object({"from": 0, "rollout": list(range(5))} if rank == 0 else None)

    # and the same wait on the default group does time out: the shrunken timeout is real
    if rank == 1:
        started = time.perf_counter()
        try:
            dist.broadcast(torch.zeros(1, device=runtime.device()), src=0)
            out["default_group_wait"] = "returned"
        except RuntimeError as e:
            out["default_group_wait"] = f"{type(e).__name__} after {time.perf_counter() - started:.1f}s"
    runtime.barrier()  # rank 0 waits for rank 1's verdict on the control group
    return out


@pytest.fixture(scope="module")
def rules():
    return run_distributed(_rules_worker, 2)


def test_a_host_tensor_in_a_default_group_collective_fails_as_on_nccl(rules):
    for out in rules:
        assert "NCCL rejects CPU tensors" in out["old_agreed"], out["old_agreed"]
        assert "_strict_devices_probe.py:5" in out["old_agreed"]  # names the call site


def test_stop_flag_and_control_group_agree_across_ranks(rules):
    for out in rules:
        assert out["new_agreed"] is True  # rank 1's SIGTERM stops every rank
        assert out["accelerator_sum"] == [2.0] and out["host_on_control"] == [2.0]


def test_ranks_outlive_a_rollout_longer_than_the_collective_timeout(rules):
    for out in rules:
        assert out["broadcast"] == {"from": 0, "rollout": [0, 1, 2, 3, 4]}
    # the default group really would have killed the wait
    assert rules[1]["default_group_wait"].startswith("RuntimeError after"), rules[1]["default_group_wait"]


# ---------------------------------------------------------------------------------------------------
# a whole run on two ranks under the strict mode, with a rollout longer than the default timeout


TINY = [
    "warmup.steps=20", "warmup.lr=3e-3", "data.n_train=300", "data.n_eval=8", "data.max_operand=9",
    "model.hidden_size=64", "model.num_layers=2", "model.intermediate_size=128",
    "rollout.prompts_per_step=4", "rollout.gen_prompts=8", "rollout.samples_per_prompt=4",
    "algo.num_minibatches=2", "eval.samples=2", "eval.every=2", "run.save_every=1", "reward.workers=1",
]
SLOW_STEP, SLOW_S, TIMEOUT_S = 1, 25.0, 12


def _run_worker(rank, world_size, run_dir):
    from megatron_nft import runtime
    from megatron_nft.collect import RolloutCollector
    from megatron_nft.config import load_config
    from megatron_nft.demo import run_demo

    runtime.init_process_group(timeout=datetime.timedelta(seconds=TIMEOUT_S))
    collect = RolloutCollector.collect

    def slow_collect(self, step):
        if step == SLOW_STEP:
            time.sleep(SLOW_S)  # rank 0 generates; rank 1 waits longer than the default group allows
        return collect(self, step)

    RolloutCollector.collect = slow_collect  # in this spawned rank only
    cfg = load_config("recipes/demo.yaml", [*TINY, f"run.dir={run_dir}", "run.steps=2"])
    first = run_demo(cfg, quiet=True)
    resumed_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, steps=3, resume=True))
    second = run_demo(resumed_cfg, quiet=True)  # resumes from step 2: load_latest under the strict mode
    return first, second


@pytest.mark.slow
def test_two_rank_run_and_resume_under_strict_devices(tmp_path):
    run_dir = tmp_path / "run"
    (first, second), _ = run_distributed(_run_worker, 2, str(run_dir))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[SLOW_STEP + 1]["time/rollout_s"] > TIMEOUT_S  # the wait really outlasted the default timeout
    assert "stopped_at" not in first and "stopped_at" not in second
    assert (run_dir / "checkpoints" / "step_000003" / "manifest.json").is_file()
