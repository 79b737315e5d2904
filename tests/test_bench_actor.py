"""bench/actor_throughput.py is ready to run on a GPU: it runs end to end on CPU with a tiny shape, and
its FLOP count describes what the actor computes (torch's FlopCounterMode on the actor's own forward;
the attention term's formula is checked in tests/test_plan.py)."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "actor_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("actor_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["actor_throughput"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("actor_throughput", None)


def test_sequence_lengths_fill_the_budget(bench):
    rng = random.Random(0)
    for tokens, rows in [(4096, 8), (16384, 8), (300, 7)]:
        lengths = bench.sequence_lengths(tokens, rows, rng, spread=0.5)
        assert len(lengths) == rows and sum(lengths) == tokens
        assert min(lengths) >= 2


def test_variant_names(bench):
    assert bench.parse_variant("bf16") == bench.Variant("bf16")
    assert bench.parse_variant("fp8-blockwise+full") == bench.Variant("fp8-blockwise+full", fp8="hybrid",
                                                                      fp8_recipe="blockwise", recompute="full")
    with pytest.raises(SystemExit, match="not bf16"):
        bench.parse_variant("int4")


def test_gemm_flops_match_the_counter_on_the_actor(bench):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_nft import runtime
    from megatron_nft.plan import forward_flops_per_token, model_shape

    runtime.init_process_group()
    shape = model_shape(bench.TINY)
    lengths = bench.sequence_lengths(300, 5, random.Random(0))
    batch = bench.make_batch(shape, lengths, seed=0)
    actor = bench.build_actor(shape, bench.Variant("bf16"), tokens=400, dtype="fp32")
    with FlopCounterMode(display=False) as counter:
        actor.compute_logprobs({k: batch[k] for k in ("tokens", "loss_mask")})
    counted = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    gemm = sum(n * forward_flops_per_token(shape, n)[0] for n in lengths)
    assert counted.get("aten.mm", 0) + counted.get("aten.addmm", 0) == gemm
    attention = sum(n * forward_flops_per_token(shape, n)[1] for n in lengths)
    assert bench.step_flops(shape, lengths) == pytest.approx(3 * (gemm + attention))
    del actor
    torch.manual_seed(0)


def _result_rows(*args: str, timeout: int = 600) -> tuple[str, list[str]]:
    """Runs the script with `args` and returns its stdout and its result rows (one per variant x budget)."""
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, [line for line in out.stdout.splitlines() if "-token budget" in line]


def test_script_runs_on_cpu():
    stdout, rows = _result_rows("--model", "tiny", "--tokens", "256", "--steps", "1", "--warmup", "0",
                                "--variants", "bf16,bf16+full")
    assert len(rows) == 2, stdout
    assert "fp32" in rows[0] and "(1.00x baseline)" in rows[0]
    assert "(4 micro-batches of 256 tokens on average, 32 sequences)" in rows[0]  # the budget filled exactly
    assert "fp32+full" in rows[1]
    # recomputation changes the time, not the step: the same loss
    assert rows[0].rsplit("loss ", 1)[1] == rows[1].rsplit("loss ", 1)[1]
    assert stdout.startswith("machine: ")


@pytest.mark.gpu
def test_script_runs_on_cuda_with_recompute():
    """The GPU path end to end at a small shape: bf16, compiled flex attention (local layers) or TE,
    recompute; MFU printed against the device's peak."""
    stdout, rows = _result_rows("--model", "qwen2.5-0.5b", "--tokens", "2048", "--steps", "2", "--warmup", "1",
                                "--variants", "bf16,bf16+full", timeout=1200)
    assert len(rows) == 2 and all("MFU" in r and "GiB" in r for r in rows), stdout
