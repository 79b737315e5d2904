"""The SGLang backend: payloads checked with SGLang's own code, recorded responses parsed, and the
client run end to end against two local-engine HTTP servers (real processes, real model), one of
which is killed mid-rollout.

SGLang is imported only in a child process (tests/sglang_schema.py): `pip install --no-deps
sglang==0.5.23` (Makefile) gives its request classes; importing it patches transformers, which the
references in this process must not see. One child answers every schema question of this module,
and also joins a weight-update process group built by SGLang's own init_custom_process_group
(gloo standing in for NCCL) to receive a bucket our NCCL transport broadcasts.

Tests share one pair of servers launched through make_engine; the kill test runs last.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import hf_token_logprobs, random_qwen2
from megatron_nft.rollout import LocalEngine, SamplingParams, make_engine, protocol
from megatron_nft.rollout.control import post_all, request_json
from megatron_nft.rollout.servers import sglang_command
from megatron_nft.rollout.sglang_client import RequestRejected, SGLangEngine
from megatron_nft.rollout.weight_sync import CudaIpcTransport, NcclBroadcastTransport, init_weight_update_group
from megatron_nft.runtime import free_port

HERE = Path(__file__).parent
FIXTURES = HERE / "data" / "sglang_responses"
VOCAB = 101
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]


def reference_logprobs(model, prompt, tokens, temperature=1.0) -> torch.Tensor:
    """Teacher-forced log-probs of `tokens` after `prompt` from transformers' own forward."""
    seq = torch.tensor([list(prompt) + list(tokens)])
    lp = hf_token_logprobs(model, seq, temperature)[0]
    return lp[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


def assert_matches_model(completions, prompts, model, temperature=1.0):
    for c in completions:
        expected = reference_logprobs(model, prompts[c.prompt_index], c.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)


def raw(method, url, body=None):
    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as session:
            return await request_json(session, method, url, body, timeout_s=60)

    return asyncio.run(go())


# ----------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The references run in this process next to three others on a shared 2-core box: torch's
    thread pool spinning under oversubscription makes a tiny forward take ~60x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    """The SGLang child process, started first so that its import overlaps the servers' start-up."""
    log = open(tmp_path_factory.mktemp("checker") / "stderr.log", "w+")
    proc = subprocess.Popen([sys.executable, str(HERE / "sglang_schema.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    proc.log = log
    yield proc
    log.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    _, model_a = random_qwen2(vocab=VOCAB, seed=0)
    _, model_b = random_qwen2(vocab=VOCAB, seed=1)
    path = tmp_path_factory.mktemp("model_a")
    model_a.save_pretrained(path)
    return model_a, model_b, path


@pytest.fixture(scope="module")
def engine(models, checker, tmp_path_factory):
    """Two local HTTP servers launched by make_engine (random weights), then synced to model A."""
    from megatron_nft.config import load_config

    model_a, _, path = models
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(None, ["rollout.engine=local_http", "rollout.num_servers=2", "rollout.max_concurrency=2",
                             "rollout.max_retries=2", "rollout.request_timeout_s=120", "rollout.server_args=[--threads,1]"])
    eng = make_engine(cfg.rollout, hf_config=model_a.config, model_path=str(path), run_dir=run_dir, seed=0)
    eng.backoff_s = 0.2
    eng.update_weights(model_a.named_parameters(), version=1)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def schema_report(checker, engine, tmp_path):
    """Every body we send, recorded and live responses and a broadcast bucket, checked by SGLang."""
    bucket = [("model.layers.0.mlp.up_proj.weight", torch.randn(6, 4)),
              ("model.norm.weight", torch.arange(5, dtype=torch.bfloat16))]
    nccl = NcclBroadcastTransport("127.0.0.1", free_port(), ranks_per_server=2, group_name="wsync", backend="gloo")
    dist_body = nccl.bucket_body(bucket, "wsync", 7)
    requests = {
        "generate_one": ("GenerateReqInput", protocol.generate_body([[1, 2, 3]], SamplingParams(max_new_tokens=5))),
        "generate_n": ("GenerateReqInput", protocol.generate_body(
            [[1, 2, 3]], SamplingParams(temperature=0.6, top_p=0.7, n=4, stop_token_ids=(2, 9), seed=5))),
        "generate_batch": ("GenerateReqInput", protocol.generate_body([[1, 2], [3, 4, 5]], SamplingParams(n=2))),
        "disk": ("UpdateWeightFromDiskReqInput", protocol.update_from_disk_body("/shared/weights_v000007", 7)),
        "init_group": ("InitWeightsUpdateGroupReqInput", nccl.init_bodies(["http://a", "http://b"])[1]),
        "distributed": ("UpdateWeightsFromDistributedReqInput", dist_body),
        "tensor": ("UpdateWeightsFromTensorReqInput", CudaIpcTransport(ranks_per_server=2, device="cpu").bucket_body(bucket, 7)),
        "pause": ("PauseGenerationReqInput", protocol.pause_body()),
        "continue": ("ContinueGenerationReqInput", protocol.continue_body()),
        # negative controls: the checker must reject a renamed field
        "bad_disk": ("UpdateWeightFromDiskReqInput", {"model_dir": "/x"}),
        "bad_sampling": ("GenerateReqInput", {"input_ids": [1, 2], "sampling_params": {"max_tokens": 4}}),
    }
    url = engine.urls[0]
    live_single = raw("POST", url + "/generate", protocol.generate_body([PROMPTS[0]], SamplingParams(max_new_tokens=4)))[1]
    live_batch = raw("POST", url + "/generate", protocol.generate_body(
        PROMPTS[:2], SamplingParams(max_new_tokens=6, n=2, stop_token_ids=tuple(range(0, VOCAB, 3)))))[1]
    responses = {p.stem: json.loads(p.read_text()) for p in sorted(FIXTURES.glob("*.json"))}
    responses.update(live_single=live_single, live_batch=live_batch)
    out = tmp_path / "received.pt"
    from test_weight_sync import FakeCudaReduction

    fake_cuda = CudaIpcTransport(ranks_per_server=2, device="cpu", reduce_tensor=FakeCudaReduction(device_index=3),
                                 device_uuid={3: "GPU-5a1e-0003"}.__getitem__)
    job = {
        "requests": [{"cls": c, "body": b} for c, b in requests.values()],
        "responses": list(responses.values()),
        "server_argv": sglang_command("/models/q7b", port=31000, tp_size=2, mem_fraction_static=0.7, random_seed=3)[3:],
        "group": {"master_address": "127.0.0.1", "master_port": nccl.master_port, "rank": 1, "world_size": 2,
                  "group_name": "wsync", "backend": "gloo", "body": dist_body, "out": str(out)},
        "weight_update_rules": True,
        # the trainer's GPU 3 is the server's GPU 1 (another CUDA_VISIBLE_DEVICES)
        "cuda_payloads": {"visible_uuids": ["GPU-0ther-0000", "GPU-5a1e-0003"],
                          "payloads": fake_cuda.bucket_body(bucket, 7)["serialized_named_tensors"]},
    }
    checker.stdin.write(json.dumps(job))
    checker.stdin.close()
    # our side of the weight-update group: what NcclBroadcastTransport.send does per bucket
    group = init_weight_update_group("127.0.0.1", nccl.master_port, 0, 2, "wsync", "gloo")
    for _, tensor in bucket:
        group.broadcast(tensor.contiguous(), 0).wait()
    stdout = checker.stdout.read()
    checker.wait(timeout=600)
    checker.log.seek(0)
    assert checker.returncode == 0, checker.log.read()[-3000:]
    report = json.loads(stdout.split("REPORT ", 1)[1])
    report["requests"] = dict(zip(requests, report["requests"]))
    report["responses"] = dict(zip(responses, report["responses"]))
    report["received"] = torch.load(out)
    report["sent"] = dict(bucket)
    return report


@pytest.fixture(scope="module")
def tmp_path(tmp_path_factory):
    return tmp_path_factory.mktemp("client")


# ----------------------------------------------------------------------------------------------------
# payloads and responses against SGLang
# ----------------------------------------------------------------------------------------------------


def test_request_bodies_are_sglang_requests(schema_report):
    errors = schema_report["requests"]
    bad = {k: v for k, v in errors.items() if not k.startswith("bad_") and v is not None}
    assert not bad, bad
    # the checker does reject what SGLang would not take
    assert "model_dir" in errors["bad_disk"]
    assert "max_tokens" in errors["bad_sampling"]


def test_sglang_server_flags(schema_report):
    assert schema_report["server_args"] == {
        "model_path": "/models/q7b", "host": "127.0.0.1", "port": 31000, "tp_size": 2, "dp_size": 1,
        "mem_fraction_static": 0.7, "random_seed": 3, "dtype": "auto", "load_format": "auto",
        "enable_deterministic_inference": True,  # else SGLang ignores our per-request sampling seeds
    }


def test_cuda_payload_opens_the_senders_gpu_in_sglang(schema_report):
    """SGLang's own deserialization of each rank's payload (its patched CUDA rebuild, a recorder in
    place of torch's) opens the handles on the GPU whose UUID the trainer's device has, whatever
    index the server gives it."""
    assert schema_report["cuda_payloads"] == [[1, 1], [1, 1]]


def test_stand_in_answers_weight_updates_as_sglang(schema_report, engine, models):
    """The session sequence SGLang's scheduler answered (in the child) replayed on the stand-in
    server: the same success flags and messages; failures with the status SGLang's routes use; the
    routes SGLang serves only at dp_size 1 are the stand-in's."""
    rules = schema_report["weight_update_rules"]
    url = engine.urls[0]
    model_a = models[0]
    ours = CudaIpcTransport(device="cpu").bucket_body(list(model_a.named_parameters()), 1)  # the same weights again
    bodies = {"tensor": ("/update_weights_from_tensor", ours),
              "distributed": ("/update_weights_from_distributed", NcclBroadcastTransport.bucket_body([], "g", 1)),
              "begin": ("/begin_weight_update", protocol.begin_update_body()),
              "end": ("/end_weight_update", protocol.end_update_body())}
    status_name = {400: "BAD_REQUEST"}
    for label, success, message in rules["session"]:
        path, body = bodies[label]
        status, answer = raw("POST", url + path, body)
        assert (answer["success"], answer["message"]) == (success, message), (label, answer)
        assert status == 200 if success else [status_name.get(status)] == rules["status"][path], (label, status)
    assert set(protocol.SINGLE_DP_ROUTES) == set(rules["single_dp"]) & {
        "/destroy_weights_update_group", "/init_weights_update_group", "/update_weights_from_distributed",
        "/update_weights_from_tensor", "/update_weights_from_disk"}


def test_broadcast_reaches_sglang_group(schema_report):
    """Our side of the weight-update group meets SGLang's init_custom_process_group (gloo here)."""
    sent, received = schema_report["sent"], schema_report["received"]
    assert list(received) == list(sent)
    for name in sent:
        assert received[name].dtype == sent[name].dtype
        assert torch.equal(received[name], sent[name])


def test_responses_follow_sglang_contract(schema_report):
    """The recorded fixtures and the local server's live answers pass SGLang's response schema."""
    assert set(schema_report["responses"]) >= {"single_length", "n2_stop_and_length", "live_single", "live_batch"}
    assert all(v is None for v in schema_report["responses"].values()), schema_report["responses"]


def test_parse_recorded_responses():
    load = lambda name: json.loads((FIXTURES / f"{name}.json").read_text())  # noqa: E731
    [[one]] = protocol.parse_generate_response(load("single_length"), 1, 1)
    assert one == protocol.Sample([19, 7, 23], [-0.5125, -1.75, -0.03125], "length", 12)
    [[stop, length]] = protocol.parse_generate_response(load("n2_stop_and_length"), 1, 2)
    assert stop == protocol.Sample([31, 2], [-2.25, -0.125], "stop", 3)  # the matched stop token is kept
    assert length.token_ids == [40, 41, 42, 43] and length.finish_reason == "length"
    # two prompts x n=1 from the same list
    assert [s[0].token_ids for s in protocol.parse_generate_response(load("n2_stop_and_length"), 2, 1)] == [[31, 2], [40, 41, 42, 43]]
    [[text]] = protocol.parse_generate_response(load("text_logprobs_default_version"), 1, 1)
    assert text.weight_version == -1 and text.logprobs == [-0.6931471805599453, -0.0] and text.finish_reason == "stop"
    with pytest.raises(protocol.AbortedError, match="Abort before prefill"):
        protocol.parse_generate_response(load("batch_abort"), 1, 1)
    with pytest.raises(protocol.ProtocolError, match="returned 2 items, expected 1 prompts x n=4"):
        protocol.parse_generate_response(load("n2_stop_and_length"), 1, 4)
    broken = load("single_length")
    broken["meta_info"]["output_token_logprobs"] = broken["meta_info"]["output_token_logprobs"][:2]
    with pytest.raises(protocol.ProtocolError, match="3 output_ids but 2 output_token_logprobs"):
        protocol.parse_generate_response(broken, 1, 1)
    broken = load("single_length")
    broken["meta_info"]["output_token_logprobs"][1][1] = 8
    with pytest.raises(protocol.ProtocolError, match=r"output_token_logprobs\[1\] is for token 8"):
        protocol.parse_generate_response(broken, 1, 1)
    broken = load("single_length")
    broken["meta_info"]["weight_version"] = "v3"
    with pytest.raises(protocol.ProtocolError, match="weight_version='v3'"):
        protocol.parse_generate_response(broken, 1, 1)


# ----------------------------------------------------------------------------------------------------
# end to end against local-engine HTTP servers
# ----------------------------------------------------------------------------------------------------


def test_generate_over_http_matches_model(engine, models):
    model_a, _, _ = models
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=10, n=3, stop_token_ids=tuple(range(0, VOCAB, 7)))
    prompts = PROMPTS * 3
    out = engine.generate(prompts, params)
    assert [c.prompt_index for c in out] == [i for i in range(len(prompts)) for _ in range(3)]
    assert {c.finish_reason for c in out} == {"stop", "length"}
    stops = set(params.stop_token_ids)
    for c in out:
        assert c.weight_version == 1
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in stops and not stops.intersection(c.token_ids[:-1])
        else:
            assert len(c.token_ids) == 10 and not stops.intersection(c.token_ids)
    assert_matches_model(out, prompts, model_a, temperature=0.8)
    # both servers served requests; nothing failed
    assert all(s.requests_ok > 0 and s.attempts_failed == 0 for s in engine.last_stats.servers)
    assert sum(s.requests_ok for s in engine.last_stats.servers) == len(prompts)


def test_weight_update_through_disk(engine, models):
    model_a, model_b, _ = models
    root = Path(engine.transport.root)
    engine.update_weights(((n, p.detach().clone()) for n, p in model_b.named_parameters()), version=5)
    assert engine.weight_version == 5 and engine.last_sync.num_tensors == len(list(model_b.parameters()))
    assert sorted(p.name for p in root.glob("weights_v*")) == ["weights_v000005"]  # old version removed, no tmp
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, n=2))
    assert {c.weight_version for c in out} == {5}
    assert_matches_model(out, PROMPTS, model_b)
    info = raw("GET", engine.urls[1] + "/get_model_info")[1]
    assert info["weight_version"] == "5" and info["model_path"].endswith("weights_v000005")
    engine.update_weights(model_a.named_parameters(), version=6)
    assert_matches_model(engine.generate(PROMPTS, SamplingParams(max_new_tokens=6)), PROMPTS, model_a)
    # a failed update (a server refuses a missing tensor) raises naming the server and the tensor
    partial = [(n, p) for n, p in model_a.named_parameters() if "norm" not in n]
    with pytest.raises(Exception, match=r"/update_weights_from_disk: HTTP 400.*missing tensor"):
        engine.update_weights(partial, version=7)
    engine.update_weights(model_a.named_parameters(), version=8)
    assert {c.weight_version for c in engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))} == {8}


def test_bad_requests_are_rejected(engine):
    with pytest.raises(RequestRejected, match="token id 500"):
        engine.generate([[1, 500]], SamplingParams(max_new_tokens=2))
    status, body = raw("POST", engine.urls[0] + "/generate", {"input_ids": [1, 2], "sampling_params": {"top_k": 5}})
    assert status == 400 and "sampling_params.top_k" in body["error"]["message"]
    status, body = raw("POST", engine.urls[0] + "/generate", {"text": "hi", "sampling_params": {}})
    assert status == 400 and "text" in body["error"]["message"]


def test_pause_holds_generation_until_continue(engine, models):
    url = engine.urls[0]
    post_all([url], "/pause_generation", protocol.pause_body())
    single = SGLangEngine([url], max_concurrency=1)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(single.generate(PROMPTS[:2], SamplingParams(max_new_tokens=3))))
    worker.start()
    time.sleep(2.0)
    assert worker.is_alive() and not done  # held while paused
    post_all([url], "/continue_generation", protocol.continue_body())
    worker.join(timeout=60)
    assert len(done) == 1 and len(done[0]) == 2
    assert_matches_model(done[0], PROMPTS, models[0])


def test_deadline_drops_unresponsive_servers(engine):
    """A request past its deadline is retried, then its server dropped; with none left: an error."""
    hasty = SGLangEngine(engine.urls, request_timeout_s=0.001, max_retries=1, backoff_s=0.01, max_concurrency=1)
    with pytest.raises(RuntimeError, match="every rollout server failed.*no answer within"):
        hasty.generate(PROMPTS, SamplingParams(max_new_tokens=64))
    assert hasty.live_urls == [] and all(s.attempts_failed == 2 for s in hasty.last_stats.servers)
    with pytest.raises(RuntimeError, match="every rollout server has been dropped"):
        hasty.generate(PROMPTS, SamplingParams())


def test_config_and_factory(engine, models, tmp_path):
    from megatron_nft.config import load_config
    from megatron_nft.errors import ConfigError

    model_a = models[0]
    cfg = load_config(None, [])
    assert cfg.rollout.engine == "local"
    assert isinstance(make_engine(cfg.rollout, hf_config=model_a.config, model_path=None, run_dir=tmp_path), LocalEngine)
    urls = ",".join(engine.urls)
    cfg = load_config(None, ["rollout.engine=local_http", f"rollout.urls=[{urls}]"])
    attached = make_engine(cfg.rollout, hf_config=model_a.config, model_path=None, run_dir=tmp_path)
    assert isinstance(attached, SGLangEngine) and attached.urls == engine.urls and attached.servers == []
    assert attached.transport.root == tmp_path / "weight_sync"
    for override, message in [
        ("rollout.engine=vllm", "rollout.engine='vllm': allowed values are local, local_http, sglang"),
        ("rollout.urls=[ftp://x]", "rollout.urls: 'ftp://x' is not an http(s):// URL"),
        ("rollout.num_servers=0", "rollout.num_servers=0: must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(None, ["rollout.engine=sglang", override])
    with pytest.raises(ConfigError, match="rollout.weight_transport=nccl: only rollout.engine=sglang"):
        load_config(None, ["rollout.engine=local_http", "rollout.weight_transport=nccl"])


def test_server_killed_mid_rollout_loses_nothing(engine, models):
    """SIGKILL one of the two servers while a rollout is running: every (prompt, sample) comes back
    exactly once, from the survivor, and is still the model's own sample."""
    prompts = [[(7 * i + j) % VOCAB for j in range(3 + i % 4)] for i in range(32)]
    params = SamplingParams(max_new_tokens=40, n=3)
    victim = engine.servers[1]
    result: list = []
    errors: list = []

    def rollout():
        try:
            result.append(engine.generate(prompts, params))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=rollout)
    thread.start()
    killed_at = None
    deadline = time.monotonic() + 300
    while thread.is_alive() and time.monotonic() < deadline:
        stats = {s.url: s for s in engine.last_stats.servers}
        victim_stats = stats.get(victim.url)
        done = sum(s.requests_ok for s in stats.values())
        if victim_stats is not None and victim_stats.requests_ok >= 1 and done <= len(prompts) - 8:
            victim.kill()
            killed_at = done
            break
        time.sleep(0.02)
    thread.join(timeout=300)
    assert not errors, errors
    assert killed_at is not None, "the rollout finished before the server could be killed mid-way"
    out = result[0]
    keys = [(c.prompt_index, j) for i, c in enumerate(out) for j in [i % params.n]]
    assert len(out) == len(prompts) * params.n
    assert sorted(keys) == sorted(set(keys)) == [(p, j) for p in range(len(prompts)) for j in range(params.n)]
    assert [c.prompt_index for c in out] == [p for p in range(len(prompts)) for _ in range(params.n)]
    stats = {s.url: s for s in engine.last_stats.servers}
    assert not stats[victim.url].alive and victim.url not in engine.live_urls
    assert engine.last_stats.resent >= 1 and stats[victim.url].attempts_failed >= 1
    assert sum(s.requests_ok for s in stats.values()) == len(prompts)  # each prompt answered once
    assert_matches_model(out, prompts, models[0])

    # the server restarted in place (its launch weights: model A) rejoins at the next weight sync, which
    # gives it the current weights (model B) before it answers anything
    from megatron_nft.rollout.control import wait_healthy
    from megatron_nft.rollout.servers import launch_server, local_server_command

    port = int(victim.url.rsplit(":", 1)[1])
    restarted = launch_server(local_server_command(str(models[2]), port=port, extra_args=["--threads", "1"]), victim.url,
                              Path(victim.log_path).with_suffix(".restart.log"))
    try:
        wait_healthy([victim.url], timeout_s=120, alive=lambda _: restarted.check_alive())
        assert victim.url not in engine.live_urls  # not mid-rollout: only at a sync
        engine.update_weights(models[1].named_parameters(), version=2)
        assert engine.rejoined == [victim.url] and victim.url in engine.live_urls
        out = engine.generate(prompts[:8], SamplingParams(max_new_tokens=10, n=2))
        served = {s.url: s.requests_ok for s in engine.last_stats.servers}
        assert served[victim.url] >= 1  # the rejoined server took its share
        assert all(c.weight_version == 2 for c in out)
        assert_matches_model(out, prompts[:8], models[1])
    finally:
        restarted.stop()


# ----------------------------------------------------------------------------------------------------
# a real SGLang server (GPU machines with sglang installed)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_real_sglang_server_matches_hf(models, tmp_path):
    from megatron_nft.rollout.servers import launch_servers
    from megatron_nft.rollout.weight_sync import DiskTransport

    model_a, model_b, path = models
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = sglang_command(str(path), port=port, mem_fraction_static=0.3, dtype="float32", extra_args=["--skip-tokenizer-init"])
    servers = launch_servers([(cmd, url)], tmp_path / "logs")
    eng = SGLangEngine([url], servers=servers, transport=DiskTransport(tmp_path / "sync"))
    try:
        eng.wait_ready(timeout_s=900)
        out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=8, n=2, stop_token_ids=(3,)))
        for c in out:
            expected = reference_logprobs(model_a, PROMPTS[c.prompt_index], c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=2e-3, rtol=0)
        eng.update_weights(model_b.named_parameters(), version=4)
        out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=8))
        assert {c.weight_version for c in out} == {4}
        for c in out:
            expected = reference_logprobs(model_b, PROMPTS[c.prompt_index], c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=2e-3, rtol=0)
    finally:
        eng.close()
