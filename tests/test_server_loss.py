"""Losing a rollout server between rollouts (while the trainer trains), as on a cluster: the next weight
sync drops it instead of failing (it failed the whole sync, so the trainer, so the job), generation goes
on with the others; a server its supervisor gave up (launch.supervise: 503 on its port) stays dropped;
one restarted in place is taken back, with the current weights, at the next sync. Two CPU stand-ins of
SGLang (real processes, real weights) and the supervisor's real given-up answer."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import hf_token_logprobs, random_qwen2

REPO = Path(__file__).resolve().parent.parent
VOCAB = 101


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core box: the references beside two server processes
    yield
    torch.set_num_threads(threads)


def assert_from_model(completions, prompts, model):
    for c in completions:
        seq = torch.tensor([prompts[c.prompt_index] + c.token_ids])
        with torch.no_grad():
            expected = hf_token_logprobs(model, seq)[0, len(prompts[c.prompt_index]) - 1 : -1]
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)


def until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_server_lost_between_rollouts_is_dropped_at_the_sync_given_up_stays_out_restarted_comes_back(tmp_path):
    from launch.supervise import GIVEN_UP
    from launch.wait_for_servers import health
    from megatron_nft.config import load_config
    from megatron_nft.rollout import SamplingParams, make_engine
    from megatron_nft.rollout.control import wait_healthy
    from megatron_nft.rollout.servers import launch_server, local_server_command

    _, model_a = random_qwen2(vocab=VOCAB, seed=0)
    _, model_b = random_qwen2(vocab=VOCAB, seed=1)
    model_a.save_pretrained(tmp_path / "a")
    cfg = load_config(None, ["rollout.engine=local_http", "rollout.num_servers=2", "rollout.max_concurrency=2",
                             "rollout.max_retries=1", "rollout.request_timeout_s=120", "rollout.server_args=[--threads,1]"])
    engine = make_engine(cfg.rollout, hf_config=model_a.config, model_path=str(tmp_path / "a"), run_dir=tmp_path / "run", seed=0)
    engine.backoff_s = 0.1
    prompts = [[(5 * i + j) % VOCAB for j in range(3 + i % 3)] for i in range(8)]
    params = SamplingParams(max_new_tokens=6, n=2)
    victim = engine.servers[1]
    port = int(victim.url.rsplit(":", 1)[1])
    supervisor = restarted = None
    try:
        engine.update_weights(model_a.named_parameters(), version=1)
        assert engine.live_urls == engine.urls
        # the server dies while the trainer trains: the next sync drops it and updates the other
        victim.kill()
        engine.update_weights(model_b.named_parameters(), version=2)
        assert engine.live_urls == [engine.urls[0]] and engine.rejoined == []
        out = engine.generate(prompts, params)
        assert len(out) == len(prompts) * params.n and all(c.weight_version == 2 for c in out)
        assert_from_model(out, prompts, model_b)

        # its supervisor gave it up (restarts used): 503 on its port, never taken back
        supervisor = subprocess.Popen([sys.executable, "-m", "launch.supervise", "--restarts", "0", "--delay", "0",
                                       "--host", "127.0.0.1", "--port", str(port), "--", "sh", "-c", "exit 1"],
                                      cwd=REPO, stderr=subprocess.DEVNULL)
        until(lambda: health(victim.url).startswith(GIVEN_UP), 30, "the given-up answer")
        engine.update_weights(model_a.named_parameters(), version=3)
        assert engine.live_urls == [engine.urls[0]] and engine.rejoined == []
        assert all(c.weight_version == 3 for c in engine.generate(prompts[:2], params))
        supervisor.kill()
        supervisor.wait()

        # restarted in place (its launch weights: model A): the next sync takes it back with model B
        restarted = launch_server(local_server_command(str(tmp_path / "a"), port=port, extra_args=["--threads", "1"]),
                                  victim.url, tmp_path / "restarted.log")
        wait_healthy([victim.url], timeout_s=180, alive=lambda _: restarted.check_alive())
        engine.update_weights(model_b.named_parameters(), version=4)
        assert engine.rejoined == [victim.url] and engine.live_urls == engine.urls
        out = engine.generate(prompts, params)
        served = {s.url: s.requests_ok for s in engine.last_stats.servers}
        assert served[victim.url] >= 1 and all(c.weight_version == 4 for c in out)
        assert_from_model(out, prompts, model_b)

        # every server gone: the sync says so in one line
        restarted.kill()
        engine.servers[0].kill()
        with pytest.raises(RuntimeError, match="no rollout server answers /health"):
            engine.update_weights(model_a.named_parameters(), version=5)
    finally:
        for proc in (supervisor,):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if restarted is not None:
            restarted.stop()
        engine.close()
