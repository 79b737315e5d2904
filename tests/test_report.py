"""Per-step telemetry (metrics.py's figures, the trainer's time/ and perf/ keys, SGLangEngine's request
times) and `megatron-nft report` on real short runs: one rank through the CLI, two ranks (DP=2)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from helpers import tiny_hf_checkpoint
from megatron_nft import metrics as perf
from megatron_nft import plan
from megatron_nft.cli import main
from megatron_nft.model.qwen2 import shape_from_hf

FIXTURES = Path(__file__).parent / "data" / "sglang_responses"
PHASE_KEYS = ("time/generate_s", "time/grade_s", "time/old_logprobs_s", "time/train_s", "time/sync_s")


# ---------------------------------------------------------------------------------------------------
# the figures, against independent references


def test_percentile_is_numpys_linear_percentile():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        xs = rng.integers(0, 5000, n).tolist()
        for q in (0, 50, 90, 100):
            assert perf.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_forward_flops_match_the_planners_step_count():
    """Summed sequence by sequence, they equal the planner's rows x E[S^2] formula for the same lengths."""
    shape = plan.model_shape("qwen2.5-0.5b")
    prompt, responses = 300, (10, 900, 2048, 4000)
    work = plan.Workload(prompt_len=prompt, response_len=4096, prompts_per_step=1, samples_per_prompt=len(responses),
                         response_lengths=tuple(float(r) for r in responses))
    gemm, attention = plan.step_model_flops(shape, work)
    assert perf.forward_flops(shape, [prompt + r for r in responses]) == pytest.approx(gemm + attention, rel=1e-12)
    # by hand for one sequence: 2 x matmul parameters per token + 2*nq*d*S per token per layer
    s = 128
    by_hand = s * (2 * plan.matmul_parameters(shape) + shape.num_layers * 2 * shape.num_heads * shape.head_dim * s)
    assert perf.forward_flops(shape, [s]) == pytest.approx(by_hand)


def test_actor_performance_is_four_forwards_over_time_and_gpus():
    shape = plan.model_shape("qwen2.5-0.5b")
    seqs = [512, 1024]
    out = perf.actor_performance(shape, seqs, actor_seconds=2.0, world_size=4, peak_tflops=989.4)
    want = 4 * perf.forward_flops(shape, seqs) / (2.0 * 4) / 1e12
    assert out["perf/actor_tflops_per_gpu"] == pytest.approx(want)
    assert out["perf/mfu"] == pytest.approx(want / 989.4)
    assert "perf/mfu" not in perf.actor_performance(shape, seqs, 2.0, 4, None)  # CPU: TFLOP/s only


def test_peak_memory_on_cpu_is_the_processes_high_water_mark():
    hwm_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
    assert perf.peak_memory_bytes() == pytest.approx(hwm_kib * 1024, rel=0.05)


def test_progress_line_is_short():
    fields = perf.progress_fields({"rollout/reward": 0.5, "time/step_s": 12.34, "perf/gen_tokens_per_s": 1234.5,
                                   "perf/actor_tflops_per_gpu": 0.0123, "perf/mfu": 0.41, "actor/loss": 1.0}, 0.25)
    assert fields == {"reward": "0.50", "heldout_acc": "0.25", "s/step": "12.3", "gen_tok/s": "1234", "mfu": "41%"}


# ---------------------------------------------------------------------------------------------------
# the slowest request, timed by the SGLang client


def _slow_server(delays: dict[int, float]):
    """An HTTP server answering /generate with a recorded SGLang response after delays[input_ids[0]]."""
    from aiohttp import web

    payload = json.loads((FIXTURES / "single_length.json").read_text())

    async def generate(request):
        body = await request.json()
        await asyncio.sleep(delays[body["input_ids"][0]])
        return web.json_response(payload)

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/generate", generate)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}", lambda: loop.call_soon_threadsafe(loop.stop)


def test_sglang_engine_times_each_request():
    from megatron_nft.rollout import SamplingParams
    from megatron_nft.rollout.sglang_client import SGLangEngine

    url, stop = _slow_server({1: 0.05, 2: 0.1, 3: 0.6})
    try:
        engine = SGLangEngine([url], max_concurrency=3)
        engine.generate([[1], [2], [3]], SamplingParams(n=1, max_new_tokens=3))
        seconds = engine.take_request_seconds()
        assert len(seconds) == 3 and 0.6 <= max(seconds) < 1.5 and min(seconds) < 0.4
        assert engine.take_request_seconds() == []  # taken once
    finally:
        stop()


# ---------------------------------------------------------------------------------------------------
# short real runs


def train_args(hf: Path, data: Path, run_dir: Path) -> list[str]:
    # GRPO drops no group, so a random model's all-wrong groups still train (and are timed)
    return ["train", "--quiet", f"model.hf_path={hf}", "data.task=jsonl", f"data.train_path={data}", f"run.dir={run_dir}",
            "data.template=raw", "data.max_prompt_len=64", "rollout.max_new_tokens=8", "rollout.prompts_per_step=2",
            "rollout.gen_prompts=2", "rollout.samples_per_prompt=2", "algo.name=grpo", "algo.num_minibatches=1",
            "reward.workers=1", "run.steps=3", "run.save_every=1"]


def _train_two_ranks(rank, world_size, args):
    code = main(args)
    return {"code": code, "peak": perf.peak_memory_bytes()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_nft.testing import run_distributed

    root = tmp_path_factory.mktemp("report")
    hf = tiny_hf_checkpoint(root / "model")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(8)))
    one, two = root / "one-rank", root / "two-ranks"
    assert main(train_args(hf, data, one)) == 0
    results = run_distributed(_train_two_ranks, 2, [str(a) for a in train_args(hf, data, two)])
    assert [r["code"] for r in results] == [0, 0]
    return {"hf": hf, "one": one, "two": two, "peaks": [r["peak"] for r in results]}


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]


@pytest.mark.slow  # a 1-rank and a 2-rank run (~1 min on the 2-core box)
def test_every_step_logs_its_phases_and_figures(runs):
    shape = shape_from_hf(json.loads((runs["hf"] / "config.json").read_text()))
    for name, ranks in (("one", 1), ("two", 2)):
        steps = rows(runs[name])
        assert [r["step"] for r in steps] == [1, 2, 3]
        for r in steps:
            named = sum(r[k] for k in PHASE_KEYS)
            assert all(r[k] >= 0 for k in PHASE_KEYS) and named <= r["time/step_s"] + 1e-6, (name, r)
            assert r["perf/ranks"] == ranks and r["perf/peak_mem_gib"] > 0.1
            # generated tokens: every answer of the one round, at its mean length
            assert r["perf/gen_tokens_per_s"] == pytest.approx(r["rollout/response_length"] * 2 * 2 / r["time/generate_s"])
            assert r["perf/response_len_max"] <= 8 and r["perf/response_len_p50"] <= r["perf/response_len_p90"]
            assert "perf/mfu" not in r  # CPU: no peak to divide by
            assert r["perf/actor_tflops_per_gpu"] > 0 and r["perf/train_tokens_per_s"] > 0
            # TFLOP/s and trained tokens/s come from the same tokens and the same actor seconds
            actor_s = r["time/old_logprobs_s"] + r["time/train_s"]
            tokens = r["perf/train_tokens_per_s"] * actor_s
            assert tokens == pytest.approx(round(tokens))
        # the checkpoint after step N is timed in row N + 1 (save_every=1); none before step 1
        assert steps[0]["time/checkpoint_s"] == 0 and all(r["time/checkpoint_s"] > 0 for r in steps[1:])
        assert "time/eval_s" in steps[-1]  # the last step evaluates
    # max over ranks: never above the ranks' own high-water marks at the end of the run
    assert rows(runs["two"])[-1]["perf/peak_mem_gib"] * perf.GIB <= max(runs["peaks"]) + 1


@pytest.mark.slow  # a 1-rank and a 2-rank run (~1 min on the 2-core box)
def test_report_prints_tables_side_by_side_and_writes_the_png(runs, capsys, tmp_path):
    assert main(["report", str(runs["one"]), str(runs["two"])]) == 0
    out = capsys.readouterr().out
    for name in ("one-rank", "two-ranks"):
        assert f"{name}: 3 steps" in out
    assert "1 rank(s)" in out and "2 rank(s)" in out and "side by side" in out
    for label in ("generate", "old log-probs", "train", "weight sync", "checkpoint", "trained tokens/s",
                  "actor TFLOP/s per GPU", "peak memory GiB"):
        assert label in out
    # the table's mean is the mean of the logged values
    mean = sum(r["time/train_s"] for r in rows(runs["one"])) / 3
    first_table = out.split("two-ranks: 3 steps")[0]
    assert re.search(rf"^train\s+{mean:.3f}\s", first_table, re.M), first_table
    png = runs["one"] / "time_breakdown.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    elsewhere = tmp_path / "study.png"
    assert main(["report", str(runs["two"]), "--out", str(elsewhere)]) == 0 and elsewhere.is_file()


@pytest.mark.slow  # a 1-rank and a 2-rank run (~1 min on the 2-core box)
def test_report_plan_shows_predicted_against_measured(runs, capsys):
    assert main(["report", str(runs["two"]), "--plan", "--gpu", "h200", "--mfu", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "TP1 PP1 CP1 DP2" in out and "H200" in out
    # the planner's own numbers for this config, at the run's mean response length
    from megatron_nft.config import load_config

    steps = rows(runs["two"])
    cfg = load_config(runs["two"] / "config.yaml")
    mean_len = sum(r["rollout/response_length"] for r in steps) / len(steps)
    settings = plan.Settings(gpu=plan.GPUS["h200"], mfu=0.4, stated=frozenset({"mfu"}))
    inputs = plan.from_config(cfg, settings, mean_response_len=mean_len, gen_rounds=1.0)
    lines = {x.label: x.value for x in plan.plan_layout(inputs.shape, inputs.work, inputs.layout(2), inputs.settings).time}
    measured = sum(r["time/old_logprobs_s"] for r in steps) / len(steps)
    want = lines["actor: old log-probs (forward)"]
    row = re.search(r"^old log-probs\s+(\S+)\s+(\S+)\s+(\S+)x$", out, re.M)
    assert row, out
    assert float(row.group(1)) == pytest.approx(want, rel=1e-3)
    assert float(row.group(2)) == pytest.approx(measured, rel=1e-3)
    assert float(row.group(3)) == pytest.approx(measured / want, rel=1e-2)
    assert re.search(r"^generate\s", out, re.M) and re.search(r"^train\s", out, re.M)


@pytest.mark.slow  # a 1-rank and a 2-rank run (~1 min on the 2-core box)
def test_report_bad_input_is_one_line(runs, capsys, tmp_path):
    code = main(["report", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no metrics.jsonl" in err[0] and str(tmp_path) in err[0]
    code = main(["report", str(runs["one"]), "--out", str(tmp_path / "x.txt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--out" in err[0] and ".png" in err[0]
    code = main(["report", str(runs["one"]), "--mfu", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--mfu=2.0" in err[0]
