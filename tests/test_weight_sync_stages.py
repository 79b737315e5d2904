"""Weight sync from every pipeline stage through the NCCL broadcast (gloo on CPU) and CUDA-IPC (CPU
shared memory) transports into the local SGLang stand-in, and the NCCL version check that runs
before any server starts.

The reference for "the server has the new weights" is the model itself: the server's log-probs of
its own answers must equal transformers' (in one process) or the Megatron actor's (PP=2 over gloo).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from helpers import hf_token_logprobs, random_qwen2
from megatron_nft.errors import ConfigError
from megatron_nft.rollout.weight_sync import CudaIpcTransport, NcclBroadcastTransport, tensor_bytes
from megatron_nft.testing import run_distributed

BUCKET_BYTES = 64 * 1024
PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]

# ----------------------------------------------------------------------------------------------------
# #15: the SGLang interpreter's NCCL against the trainer's, before any server starts
# ----------------------------------------------------------------------------------------------------


def fake_python(tmp_path: Path, name: str, prints: str, exit_code: int = 0) -> Path:
    """An "interpreter" that answers `-c ...` with `prints` and notes that it was asked."""
    script = tmp_path / name
    marker = tmp_path / f"{name}.asked"
    script.write_text(f"#!/bin/sh\ntouch '{marker}'\necho '{prints}'\nexit {exit_code}\n")
    script.chmod(0o755)
    return script


def asked(script: Path) -> bool:
    return script.with_name(f"{script.name}.asked").exists()


def test_nccl_versions_compared_from_the_interpreters_answer(tmp_path):
    from megatron_nft.rollout.nccl_version import check_nccl_alignment, parse_nccl_version

    assert parse_nccl_version("(2, 21, 5)\n") == (2, 21, 5)
    assert parse_nccl_version("21805") == (2, 18, 5)  # NCCL_VERSION_CODE since 2.9
    assert parse_nccl_version("2708") == (2, 7, 8)  # and before
    same = fake_python(tmp_path, "same", "(2, 27, 3)")
    assert check_nccl_alignment(str(same), own=(2, 27, 3)) == (2, 27, 3) and asked(same)
    other = fake_python(tmp_path, "other", "(2, 21, 5)")
    with pytest.raises(ConfigError) as err:
        check_nccl_alignment(str(other), own=(2, 27, 3))
    line = str(err.value)
    assert "\n" not in line and f"rollout.sglang_python={other}" in line
    assert "NCCL 2.21.5" in line and "NCCL 2.27.3" in line and "rollout.weight_transport=disk" in line
    assert "/opt/sglang/bin/python" in line
    for script, expected in [
        (fake_python(tmp_path, "broken", "ModuleNotFoundError: No module named 'torch'", 1), r"cannot report its NCCL version \(exit 1"),
        (fake_python(tmp_path, "garbage", "hello"), r"its NCCL version: expected a version such as \(2, 21, 5\), got 'hello'"),
        (tmp_path / "missing", "no such interpreter"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            check_nccl_alignment(str(script), own=(2, 27, 3))


def test_engine_factory_checks_nccl_before_servers_and_skips_disk(tmp_path):
    """make_engine asks rollout.sglang_python for its NCCL only with the nccl transport, and a
    mismatch stops it before any server is launched; with disk the interpreter is not asked."""
    import dataclasses

    from megatron_nft.config import RolloutConfig
    from megatron_nft.rollout import make_engine
    from megatron_nft.rollout.nccl_version import format_version, own_nccl_version

    own = own_nccl_version()
    mismatch = fake_python(tmp_path, "mismatch", f"({own[0]}, {own[1] + 1}, 0)")
    cfg = dataclasses.replace(RolloutConfig(), engine="sglang", weight_transport="nccl", sglang_python=str(mismatch),
                              num_servers=1)
    with pytest.raises(ConfigError, match=rf"loads NCCL {own[0]}\.{own[1] + 1}\.0 and this trainer NCCL {re.escape(format_version(own))}"):
        make_engine(cfg, hf_config=None, model_path=str(tmp_path / "model"), run_dir=tmp_path / "run")
    assert asked(mismatch) and not (tmp_path / "run" / "rollout_servers").exists()  # nothing was launched

    # disk: never asked. Attached to a port nobody serves, so the factory fails later, waiting.
    untouched = fake_python(tmp_path, "untouched", "(9, 9, 9)")
    cfg = dataclasses.replace(cfg, weight_transport="disk", sglang_python=str(untouched), urls=["http://127.0.0.1:9"],
                              server_start_timeout_s=1.0)
    with pytest.raises(Exception) as err:
        make_engine(cfg, hf_config=None, model_path=str(tmp_path / "model"), run_dir=tmp_path / "run")
    assert not isinstance(err.value, ConfigError) and not asked(untouched)


# ----------------------------------------------------------------------------------------------------
# per-stage sends into the stand-in, in one process (two "stages" taking their turns here)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from megatron_nft.rollout.control import wait_healthy
    from megatron_nft.rollout.servers import free_ports, launch_servers, local_server_command

    tmp = tmp_path_factory.mktemp("stage_server")
    config, _ = random_qwen2(seed=3)
    config.save_pretrained(tmp / "model")  # config only: random weights until the first sync
    [port] = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    [proc] = launch_servers([(local_server_command(str(tmp / "model"), port=port, load_format="dummy", threads=1), url)],
                            tmp / "logs")
    try:
        wait_healthy([url], timeout_s=300, alive=lambda _: proc.check_alive())
        yield url
    finally:
        proc.stop()


def make_transport(kind: str):
    from megatron_nft.rollout.servers import free_ports

    if kind == "nccl":
        return NcclBroadcastTransport("127.0.0.1", free_ports(1)[0], backend="gloo", group_name=f"stages_{kind}")
    return CudaIpcTransport(device="cpu")


def assert_serves(engine, model, version):
    from megatron_nft.rollout import SamplingParams

    for c in engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, n=2, seed=version)):
        seq = torch.tensor([PROMPTS[c.prompt_index] + c.token_ids])
        with torch.no_grad():
            expected = hf_token_logprobs(model, seq)[0, len(PROMPTS[c.prompt_index]) - 1 : -1]
        assert c.weight_version == version
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["nccl", "cuda_ipc"])
def test_two_stages_load_as_one_version(server, kind):
    """Stage 0 and stage 1 send their halves (the NCCL stages over two groups of distinct names,
    which the server joins both of, reused by the next sync); the server then serves the model's
    log-probs. A stage that failed fails the sync (half the tensors were sent), with the server's
    session closed and the groups intact: the next sync works."""
    from megatron_nft.rollout.sglang_client import SGLangEngine
    from megatron_nft.rollout.weight_sync import _STAGE_GROUPS, StageResult, write_stage

    transport = make_transport(kind)
    engine = SGLangEngine([server], transport=transport, bucket_bytes=BUCKET_BYTES)

    def sync(params, version, split):
        plan = engine.stage_plan(version, num_stages=2)
        results = [write_stage(plan, 0, iter(params[:split])), write_stage(plan, 1, iter(params[split:]))]
        return plan, engine.load_stages(plan, results)

    first_groups = None
    try:
        for version, seed in ((3, 21), (4, 22)):
            _, model = random_qwen2(seed=seed)
            params = [(n, p.detach().clone()) for n, p in model.named_parameters()]
            plan, report = sync(params, version, len(params) // 2)
            assert plan.in_turn == (kind == "nccl") and plan.urls == (server,)
            assert report.num_tensors == len(params) and report.total_bytes == sum(tensor_bytes(t) for _, t in params)
            assert report.num_buckets >= 4
            assert_serves(engine, model, version)
            if kind == "nccl":
                names = plan.options["group_names"]
                assert len(set(names)) == 2 and all(n in _STAGE_GROUPS for n in names)
                groups = {n: _STAGE_GROUPS[n][0] for n in names}
                if version == 4:
                    assert groups == first_groups  # joined once, kept across syncs
                first_groups = groups
        _, other = random_qwen2(seed=23)
        params = [(n, p.detach().clone()) for n, p in other.named_parameters()]
        plan = engine.stage_plan(5, num_stages=2)
        results = [write_stage(plan, 0, iter(params[: len(params) // 2])), StageResult(1, error="stage 1 (rank 1): OSError: boom")]
        with pytest.raises(RuntimeError, match=r"weight sync v5: stage 1 \(rank 1\): OSError: boom"):
            engine.load_stages(plan, results)
        assert engine.weight_version == 4  # the server holds half a model now (SGLang: "discard the whole weights")
        plan, _ = sync(params, 6, len(params) // 2)
        assert_serves(engine, other, 6)
    finally:
        transport.close()
    if kind == "nccl":
        assert not any(n in _STAGE_GROUPS for n in plan.options["group_names"])


def test_nccl_stage_refused_rejoins_under_a_new_name(server):
    """A bucket the server refuses (a tensor another stage sent in this session) fails the sync and
    that stage leaves its group on both sides; the next sync joins it again under a new name (the
    old name's rendezvous keys stay in the store) and the server serves the new model."""
    from megatron_nft.rollout.control import ServerError
    from megatron_nft.rollout.sglang_client import SGLangEngine
    from megatron_nft.rollout.weight_sync import _STAGE_GROUPS, StageResult, write_stage

    from megatron_nft.rollout.servers import free_ports

    transport = NcclBroadcastTransport("127.0.0.1", free_ports(1)[0], backend="gloo", group_name="rejoin")
    engine = SGLangEngine([server], transport=transport, bucket_bytes=BUCKET_BYTES)
    _, model = random_qwen2(seed=31)
    params = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    half = len(params) // 2
    try:
        plan = engine.stage_plan(7, num_stages=2)
        base = plan.options["group_names"]
        results = [write_stage(plan, 0, iter(params[:half]))]
        with pytest.raises(ServerError, match="received twice in one weight-update session"):
            write_stage(plan, 1, iter(params[half - 1 :]))
        assert base[1] not in _STAGE_GROUPS and base[0] in _STAGE_GROUPS
        results.append(StageResult(1, error="stage 1 (rank 1): ServerError: refused"))
        with pytest.raises(RuntimeError, match="weight sync v7: stage 1"):
            engine.load_stages(plan, results)
        plan = engine.stage_plan(8, num_stages=2)
        report = engine.load_stages(plan, [write_stage(plan, 0, iter(params[:half])), write_stage(plan, 1, iter(params[half:]))])
        assert report.num_tensors == len(params)
        assert base == ["rejoin_pp000", "rejoin_pp001"]
        assert [_STAGE_GROUPS[b][3] for b in base] == ["rejoin_pp000", "rejoin_pp001.1"]
        assert_serves(engine, model, 8)
    finally:
        transport.close()
    assert not any(b in _STAGE_GROUPS for b in base)


# ----------------------------------------------------------------------------------------------------
# a PP=2 actor over gloo: each stage's source rank sends its own stage, through trainer.sync_weights
# ----------------------------------------------------------------------------------------------------


def _pp2_worker(rank, world_size, config, states, url, port):
    import time

    import torch.distributed as dist

    from megatron_nft import runtime
    from megatron_nft.actor import Actor
    from megatron_nft.config import AlgoConfig, OptimConfig
    from megatron_nft.model.qwen2 import shape_from_hf
    from megatron_nft.rollout import SamplingParams
    from megatron_nft.rollout.sglang_client import SGLangEngine
    from megatron_nft.rollout.weight_sync import sync_from_stages
    from megatron_nft.trainer import sync_weights

    actor = Actor(shape_from_hf(config), tp=1, pp=2, micro_batch_size=4,
                  optim=OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0), algo=AlgoConfig(name="nft", agg="token_mean"))
    bundle = actor.bundle
    engines = {}
    if rank == 0:
        engines = {"nccl": SGLangEngine([url], transport=NcclBroadcastTransport("127.0.0.1", port, backend="gloo"),
                                        bucket_bytes=BUCKET_BYTES),
                   "cuda_ipc": SGLangEngine([url], transport=CudaIpcTransport(device="cpu"), bucket_bytes=BUCKET_BYTES)}
    out = {"stage": bundle.pp_rank, "source": bundle.stage_source, "sent": {}, "diff": {}, "report": {},
           "device": str(runtime.device())}
    for version, (kind, state) in enumerate([("nccl", 0), ("cuda_ipc", 1), ("nccl", 2)], start=1):
        actor.load_hf(states[state].__getitem__)
        engine = engines.get(kind)
        if version == 1:  # what this rank's own stage stream handed the transport, and when
            sent = []

            def recorded():
                for name, tensor in bundle.stage_tensors():
                    sent.append((name, str(tensor.device), time.time()))
                    yield name, tensor

            sync_from_stages(engine, recorded, stage=bundle.pp_rank, source=bundle.stage_source, version=version,
                             num_stages=bundle.pp)
            out["sent"] = sent
        else:
            sync_weights(actor, engine, version)  # the trainer's call
        box = [None]
        if rank == 0:
            completions = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, n=2, seed=version))
            box = [[(PROMPTS[c.prompt_index], c.token_ids, c.logprobs, c.weight_version) for c in completions]]
            out["report"][version] = (engine.last_sync.num_tensors, engine.last_sync.total_bytes)
        dist.broadcast_object_list(box, src=0)
        rows = box[0]
        width = max(len(p) + len(t) for p, t, _, _ in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        mask, engine_lp = torch.zeros(len(rows), width), torch.zeros(len(rows), width)
        for i, (p, t, lp, _) in enumerate(rows):
            tokens[i, : len(p) + len(t)] = torch.tensor(p + t)
            span = slice(len(p) - 1, len(p) - 1 + len(t))  # position s scores token s+1
            mask[i, span] = 1
            engine_lp[i, span] = torch.tensor(lp)
        actor_lp, _ = actor.compute_logprobs({"tokens": tokens})
        if rank == 0:
            out["diff"][version] = (float(((actor_lp - engine_lp).abs() * mask).max()), sorted({v for *_, v in rows}))
    for engine in engines.values():
        engine.transport.close()
    return out


@pytest.mark.slow
def test_pp2_actor_every_stage_sends_its_own_tensors(tmp_path):
    """PP=2 (two gloo ranks, each its stage's source): v1 over two NCCL groups (gloo), v2 through CPU
    shared memory, v3 over the same groups again; after each the server's log-probs are the
    actor's (|Δ| < 1e-5), and each rank handed the transport its own stage's tensors only, on the
    actor's device."""
    from megatron_nft.rollout.control import wait_healthy
    from megatron_nft.rollout.servers import free_ports, launch_servers, local_server_command

    config, _ = random_qwen2(seed=3, layers=4)
    config.save_pretrained(tmp_path / "model")
    states = [{k: v.clone() for k, v in random_qwen2(seed=s, layers=4)[1].state_dict().items()} for s in (41, 42, 43)]
    port, nccl_port = free_ports(2)
    url = f"http://127.0.0.1:{port}"
    [proc] = launch_servers([(local_server_command(str(tmp_path / "model"), port=port, load_format="dummy", threads=1), url)],
                            tmp_path / "logs")
    try:
        wait_healthy([url], timeout_s=300, alive=lambda _: proc.check_alive())
        ranks = run_distributed(_pp2_worker, 2, config, states, url, nccl_port, timeout_s=900)
    finally:
        proc.stop()
    assert [(r["stage"], r["source"]) for r in ranks] == [(0, True), (1, True)]
    names = set(states[0])
    total = sum(tensor_bytes(t) for t in states[0].values())
    for version in (1, 2, 3):
        diff, versions = ranks[0]["diff"][version]
        assert versions == [version] and diff < 1e-5, (version, diff)
        assert ranks[0]["report"][version] == (len(names), total)
    # stage 0: the embedding and layers 0-1; stage 1: layers 2-3, the final norm and the output layer
    def layer(name):
        return int(name.split(".")[2]) if name.startswith("model.layers.") else None

    sent = [{n for n, *_ in r["sent"]} for r in ranks]
    assert sent[0] == {n for n in names if n.startswith("model.embed_tokens") or (layer(n) is not None and layer(n) < 2)}
    assert sent[1] == {n for n in names if n.startswith(("model.norm", "lm_head")) or (layer(n) is not None and layer(n) >= 2)}
    assert sum(len(r["sent"]) for r in ranks) == len(names)  # each tensor once
    for r in ranks:  # runtime.device(): under the strict mode, the accelerator's stand-in (cpu:0), not the host
        assert {d for _, d, _ in r["sent"]} == {r["device"]} == {"cpu:0"}
    # NCCL: stage 1 takes its turn once stage 0 has sent everything
    assert max(t for *_, t in ranks[0]["sent"]) < min(t for *_, t in ranks[1]["sent"])


def test_nccl_stage_sender_refuses_host_tensors():
    """NCCL broadcasts GPU memory: a host tensor reaching a stage's NCCL sender is refused before any
    server is asked to receive (gloo, the CPU form, takes any)."""
    from megatron_nft.rollout.weight_sync import _sendable

    with pytest.raises(ValueError, match="nccl weight transport: got a tensor on cpu; NCCL sends GPU tensors only"):
        _sendable("nccl", torch.ones(2))
    t = torch.ones(2, 3).t()
    assert _sendable("gloo", t).is_contiguous() and torch.equal(_sendable("gloo", t), t)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["nccl", "cuda_ipc"])
def test_two_stages_into_real_sglang(kind, tmp_path):
    """The per-stage path on a GPU into a real SGLang server: two NCCL groups (one per stage, joined
    by the server side by side) or two stages' CUDA-IPC payloads, GPU tensors throughout; the
    server's log-probs then are the new model's."""
    pytest.importorskip("sglang", reason="no SGLang here (the GPU kit cannot carry it): the stand-in test below runs")
    from megatron_nft.rollout import SamplingParams
    from megatron_nft.rollout.servers import free_ports, launch_servers, sglang_command
    from megatron_nft.rollout.sglang_client import SGLangEngine
    from megatron_nft.rollout.weight_sync import write_stage

    _, model_a = random_qwen2(seed=0)
    _, model_b = random_qwen2(seed=1)
    model_a.save_pretrained(tmp_path / "model")
    port, master_port = free_ports(2)
    url = f"http://127.0.0.1:{port}"
    cmd = sglang_command(str(tmp_path / "model"), port=port, mem_fraction_static=0.3, dtype="float32",
                         extra_args=["--skip-tokenizer-init"])
    sender = NcclBroadcastTransport("127.0.0.1", master_port) if kind == "nccl" else CudaIpcTransport()
    engine = SGLangEngine([url], servers=launch_servers([(cmd, url)], tmp_path / "logs"), transport=sender,
                          bucket_bytes=64 * 1024)
    try:
        engine.wait_ready(timeout_s=900)
        params = [(n, p.detach().cuda()) for n, p in model_b.named_parameters()]
        plan = engine.stage_plan(3, num_stages=2)
        half = len(params) // 2
        engine.load_stages(plan, [write_stage(plan, 0, iter(params[:half])), write_stage(plan, 1, iter(params[half:]))])
        for c in engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, n=2)):
            seq = torch.tensor([PROMPTS[c.prompt_index] + c.token_ids])
            with torch.no_grad():
                expected = hf_token_logprobs(model_b, seq)[0, len(PROMPTS[c.prompt_index]) - 1 : -1]
            assert c.weight_version == 3
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=2e-3, rtol=0)
    finally:
        engine.close()


@pytest.mark.gpu
def test_two_stages_cuda_ipc_into_stand_in_on_gpu(server):
    """Two stages' CUDA-IPC payloads of GPU tensors (device named by UUID) into the stand-in, which
    opens the handles in its own process: its log-probs then are the model's."""
    from megatron_nft.rollout.sglang_client import SGLangEngine
    from megatron_nft.rollout.weight_sync import write_stage

    engine = SGLangEngine([server], transport=CudaIpcTransport(), bucket_bytes=BUCKET_BYTES)
    _, model = random_qwen2(seed=33)
    params = [(n, p.detach().cuda()) for n, p in model.named_parameters()]
    half = len(params) // 2
    plan = engine.stage_plan(9, num_stages=2)
    engine.load_stages(plan, [write_stage(plan, 0, iter(params[:half])), write_stage(plan, 1, iter(params[half:]))])
    assert_serves(engine, model, 9)
