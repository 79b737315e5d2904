"""Weight sync: bucketing, the disk transport's atomic writes, the CUDA-IPC payload, and a TP=2/PP=2
gloo actor synced through the local HTTP server, whose log-probs must then equal the actor's.

Payload schemas (all transports) are checked against SGLang's io_struct in test_sglang_client.py,
where the one SGLang child process of the suite runs; so is the broadcast group's handshake.
"""

from __future__ import annotations

import pickle
import weakref
from pathlib import Path

import pytest
import torch

from helpers import random_qwen2
from megatron_nft.rollout.weight_sync import (
    CudaIpcTransport,
    DiskTransport,
    NcclBroadcastTransport,
    SyncReport,
    iter_buckets,
    serialize_named_tensors,
    tensor_bytes,
)
from megatron_nft.testing import run_distributed


class LiveBytes:
    """Counts the bytes of stream tensors alive at once (weakref finalizers: freed = no longer
    referenced anywhere), so the bound is measured on the real objects, not on our bookkeeping."""

    def __init__(self):
        self.live = self.peak = self.total = self.largest = 0

    def _free(self, n):
        self.live -= n

    def watch(self, stream):
        for name, t in stream:
            n = tensor_bytes(t)
            self.live += n
            self.total += n
            self.largest = max(self.largest, n)
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, n)
            yield name, t
            del t


def named(sizes, dtype=torch.float32):
    return list(lazy_named(sizes, dtype))


def lazy_named(sizes, dtype=torch.float32):
    """Made on demand and referenced by nobody else: what actor.hf_tensors() yields."""
    for i, s in enumerate(sizes):
        yield f"t{i}", torch.full((s,), float(i), dtype=dtype)


def test_iter_buckets_bounds_order_and_errors():
    stream = named([10, 20, 5, 40, 1, 1, 30])  # float32: 4 bytes per element
    buckets = list(iter_buckets(iter(stream), bucket_bytes=120))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"], ["t6"]]
    assert all(sum(tensor_bytes(t) for _, t in b) <= 160 for b in buckets)  # t3 (160 B) alone: larger than the bound
    assert [n for b in buckets for n, _ in b] == [n for n, _ in stream]
    assert [[n for n, _ in b] for b in iter_buckets(iter(stream), 10**9)] == [[n for n, _ in stream]]
    assert list(iter_buckets(iter([]), 100)) == []
    with pytest.raises(ValueError, match="tensor 't1' appears twice"):
        list(iter_buckets(iter(stream[:2] + stream[1:2]), 100))
    with pytest.raises(ValueError, match="bucket_bytes must be an integer >= 1, got 0"):
        list(iter_buckets(iter(stream), 0))


def test_bucketing_bounds_live_memory():
    """Streaming through the disk transport's bucket loop keeps at most one bucket + one tensor alive."""
    from megatron_nft.rollout.weight_sync import _measured

    sizes = [1000, 3000, 500, 2500, 2500, 100, 4000, 1200] * 4
    meter = LiveBytes()
    report = SyncReport(version=0)
    for bucket in _measured(iter_buckets(meter.watch(lazy_named(sizes)), bucket_bytes=24000), report):
        staged = {n: t.clone() for n, t in bucket}  # a consumer's own copies, freed per bucket
        del staged, bucket
    assert meter.total == 4 * sum(sizes) == report.total_bytes and meter.live == 0  # float32: 4 bytes each
    assert report.max_bucket_bytes <= 24000 and report.num_tensors == len(sizes) and report.num_buckets > 4
    assert meter.peak <= 24000 + meter.largest < meter.total // 4


def test_disk_transport_is_atomic(tmp_path):
    """A stream that fails part-way leaves nothing behind; a complete one becomes one renamed
    directory with an HF index over per-bucket shards (the POST then fails: no server here)."""
    transport = DiskTransport(tmp_path / "sync")
    stream = named([100, 200, 300, 50])

    def failing():
        yield from stream[:3]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        transport.send(["http://127.0.0.1:9"], iter_buckets(failing(), 1400), 3, SyncReport(3))
    assert list((tmp_path / "sync").iterdir()) == []
    with pytest.raises(Exception, match="127.0.0.1:9"):
        transport.send(["http://127.0.0.1:9"], iter_buckets(iter(stream), 1400), 4, SyncReport(4))
    [final] = list((tmp_path / "sync").iterdir())
    assert final.name == "weights_v000004"
    from megatron_nft.model.hf_io import hf_tensor_reader, hf_weight_map

    weight_map = hf_weight_map(final)
    assert sorted(weight_map) == ["t0", "t1", "t2", "t3"] and len(set(weight_map.values())) == 2
    fetch = hf_tensor_reader(final)
    for name, t in stream:
        assert torch.equal(fetch(name), t)
    transport.close()
    assert list((tmp_path / "sync").iterdir()) == []


def test_tensor_payload_is_one_share_per_receiving_rank():
    """Each tensor-parallel rank of each server gets its own serialization (SGLang's rank r unpickles
    entry r only; one share is one reference for one receiver to release), and a CPU payload names
    its shared memory (file_system), which an unrelated server process can open."""
    import base64

    from megatron_nft.rollout.http_server import received_copies

    bucket = [("a", torch.randn(3, 2)), ("b", torch.arange(4, dtype=torch.bfloat16))]
    transport = CudaIpcTransport(ranks_per_server=3, device="cpu")
    bodies = [transport.bucket_body(bucket, 9) for _ in range(2)]
    payloads = [p for body in bodies for p in body["serialized_named_tensors"]]
    assert all(len(b["serialized_named_tensors"]) == 3 and b["weight_version"] == "9" for b in bodies)
    # (a CPU share names the same file each time; that each rank's share is its own serialization
    # is counted in test_cuda_payload_names_the_device_by_uuid)
    for payload in payloads:
        assert b"rebuild_storage_filename" in base64.b64decode(payload)
        restored = received_copies(payload)
        assert [n for n, _ in restored] == ["a", "b"]
        for (_, want), (_, got) in zip(bucket, restored):
            assert got.dtype == want.dtype and torch.equal(got, want)
    # torch's default (fd) strategy would hand the descriptors over the resource sharer: refused
    default = base64.b64encode(_forking_dump([("a", torch.randn(2))])).decode()
    with pytest.raises(pickle.UnpicklingError, match="rebuild_storage_fd"):
        received_copies(default)


def _forking_dump(obj) -> bytes:
    import io
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers torch's reductions

    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return buf.getvalue()


class FakeCudaReduction:
    """Stands in for torch's reduce_tensor of a CUDA tensor (which needs a GPU): records each call and
    answers what torch answers, rebuild_cuda_tensor with the sender's device index at argument 6."""

    def __init__(self, device_index):
        self.device_index, self.calls = device_index, 0

    def __call__(self, tensor):
        from torch.multiprocessing import reductions

        self.calls += 1
        handle = f"ipc-handle-{self.calls}".encode()
        return reductions.rebuild_cuda_tensor, (
            torch.Tensor, tuple(tensor.shape), tensor.stride(), 0, torch.UntypedStorage, tensor.dtype,
            self.device_index, handle, tensor.numel() * tensor.element_size(), 0, False, b"refcount", 0, b"event", True)


def cuda_payload_args(payload: str) -> list[tuple]:
    """The rebuild_cuda_tensor argument tuples a payload carries, read by a pickle VM that records
    calls instead of making them (what SGLang's rebuild would receive)."""
    import base64
    import io

    calls = []

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
                return lambda *args: calls.append(args) or ("tensor", len(calls) - 1)
            assert module.startswith("torch"), (module, name)  # the argument types (torch.Tensor, dtypes, ...)
            return super().find_class(module, name)

    Recorder(io.BytesIO(base64.b64decode(payload))).load()
    return calls


def test_cuda_payload_names_the_device_by_uuid():
    """SGLang's patched rebuild (patch_torch._device_from_maybe_uuid) finds the GPU by UUID; an index
    would open the handle on the receiver's device of that index (another GPU when the server sees
    other devices). The CPU logic here; SGLang's own rebuild is run on the payload in
    test_sglang_client.py, the real CUDA path in the gpu test below."""
    uuids = {3: "GPU-5a1e-0003"}
    reduce = FakeCudaReduction(device_index=3)
    transport = CudaIpcTransport(ranks_per_server=2, device="cpu", reduce_tensor=reduce, device_uuid=uuids.__getitem__)
    body = transport.bucket_body([("w", torch.zeros(2, 3)), ("b", torch.zeros(3))], 1)
    per_rank = [cuda_payload_args(p) for p in body["serialized_named_tensors"]]
    assert reduce.calls == 4  # 2 tensors x 2 ranks: each rank's payload is its own share
    for calls in per_rank:
        assert [c[6] for c in calls] == ["GPU-5a1e-0003"] * 2
        assert [c[1] for c in calls] == [(2, 3), (3,)]
    assert {c[7] for calls in per_rank for c in calls} == {b"ipc-handle-1", b"ipc-handle-2", b"ipc-handle-3", b"ipc-handle-4"}


def test_nccl_group_layout():
    t = NcclBroadcastTransport("10.0.0.1", 29600, ranks_per_server=2, group_name="g")
    bodies = t.init_bodies(["http://a", "http://b", "http://c"])
    assert [b["rank_offset"] for b in bodies] == [1, 3, 5] and {b["world_size"] for b in bodies} == {7}
    body = t.bucket_body([("x", torch.zeros(2, 3, dtype=torch.bfloat16)), ("y", torch.zeros(4))], "g", 2)
    assert (body["names"], body["dtypes"], body["shapes"]) == (["x", "y"], ["bfloat16", "float32"], [[2, 3], [4]])


def _hf_tensors_worker(rank, world_size, config, state, device):
    from megatron_nft.actor import Actor
    from megatron_nft.config import AlgoConfig, OptimConfig
    from megatron_nft.model.qwen2 import shape_from_hf

    actor = Actor(shape_from_hf(config), micro_batch_size=2, optim=OptimConfig(lr=1e-3, warmup_steps=0),
                  algo=AlgoConfig(name="nft"))
    actor.load_hf(lambda n: state[n])
    default = dict(actor.hf_tensors())
    elsewhere = dict(actor.hf_tensors(device=device))
    for p in actor.model.parameters():  # the stream is copies: training on does not change them
        p.data.add_(1.0)
    return {
        "actor_device": str(actor.device),
        "default": {n: (str(t.device), t.cpu()) for n, t in default.items()},
        "elsewhere": {str(t.device) for t in elsewhere.values()},
    }


def test_hf_tensors_stay_on_the_actors_device():
    """Copies on the actor's device by default (GPU transports send from there: no host round trip),
    or on the device asked for; the GPU case is test_hf_tensors_on_gpu."""
    config, model = random_qwen2(seed=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = run_distributed(_hf_tensors_worker, 1, config, state, "cpu:0", timeout_s=300)[0]
    assert {d for d, _ in out["default"].values()} == {out["actor_device"]}
    assert out["elsewhere"] == {"cpu:0"}
    for name, (_, tensor) in out["default"].items():
        assert torch.equal(tensor, state[name]), name


@pytest.mark.gpu
def test_hf_tensors_on_gpu():
    config, model = random_qwen2(seed=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = run_distributed(_hf_tensors_worker, 1, config, state, "cpu", timeout_s=300)[0]
    assert out["actor_device"].startswith("cuda")
    assert {d for d, _ in out["default"].values()} == {out["actor_device"]} and out["elsewhere"] == {"cpu"}


# ----------------------------------------------------------------------------------------------------
# the transports into stand-in server processes that keep SGLang 0.5.23's rules
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Three local HTTP servers: --tp-size 2; --tp-size 1; --dp-size 2 without deterministic inference."""
    from megatron_nft.rollout.control import wait_healthy
    from megatron_nft.rollout.servers import free_ports, launch_servers, local_server_command

    tmp = tmp_path_factory.mktemp("stand_ins")
    config, _ = random_qwen2(seed=3)
    config.save_pretrained(tmp / "model")  # config only: random weights until the first sync
    ports = free_ports(3)
    urls = {name: f"http://127.0.0.1:{p}" for name, p in zip(("tp2", "tp1", "dp2"), ports)}
    flags = {"tp2": dict(tp_size=2), "tp1": {}, "dp2": dict(dp_size=2, deterministic=False)}
    servers = launch_servers([(local_server_command(str(tmp / "model"), port=ports[i], load_format="dummy", threads=1,
                                                    **flags[name]), urls[name]) for i, name in enumerate(urls)], tmp / "logs")
    try:
        wait_healthy(list(urls.values()), timeout_s=300, alive=lambda url: [s.check_alive() for s in servers])
        yield urls
    finally:
        for server in servers:
            server.stop()


def _post(url, path, body):
    import asyncio

    import aiohttp

    from megatron_nft.rollout.control import request_json

    async def go():
        async with aiohttp.ClientSession() as session:
            return await request_json(session, "POST", url + path, body, timeout_s=60)

    return asyncio.run(go())


def test_stand_in_keeps_sglang_session_and_dp_rules(stand_ins):
    """Outside a session the tensor and broadcast routes answer 400 / success false (the broadcast
    is not joined); sessions do not nest; --dp-size 2 fails the three single-replica routes (500)."""
    from megatron_nft.rollout import protocol

    url = stand_ins["tp1"]
    tensor_body = CudaIpcTransport(device="cpu").bucket_body([("model.norm.weight", torch.ones(64))], 1)
    dist_body = NcclBroadcastTransport.bucket_body([("model.norm.weight", torch.ones(64))], "none", 1)
    status, answer = _post(url, "/update_weights_from_tensor", tensor_body)
    assert (status, answer["success"]) == (400, False) and "between begin_weight_update() and end_weight_update()" in answer["message"]
    status, answer = _post(url, "/update_weights_from_distributed", dist_body)
    assert (status, answer["success"]) == (400, False) and "between begin_weight_update()" in answer["message"]
    assert _post(url, "/end_weight_update", protocol.end_update_body())[0] == 400
    assert _post(url, "/begin_weight_update", protocol.begin_update_body()) == (200, {"success": True, "message": "Success"})
    status, answer = _post(url, "/begin_weight_update", protocol.begin_update_body())
    assert (status, answer["success"]) == (400, False) and "already open" in answer["message"]
    assert _post(url, "/end_weight_update", protocol.end_update_body())[0] == 200
    assert _post(url, "/end_weight_update", protocol.end_update_body())[0] == 400
    dp2 = stand_ins["dp2"]
    init_body = NcclBroadcastTransport("127.0.0.1", 9, backend="gloo").init_bodies([dp2])[0]
    assert _post(dp2, "/begin_weight_update", protocol.begin_update_body())[0] == 200
    for path, body in [("/update_weights_from_tensor", tensor_body), ("/update_weights_from_distributed", dist_body),
                       ("/init_weights_update_group", init_body)]:
        assert _post(dp2, path, body)[0] == 500, path
    assert _post(dp2, "/end_weight_update", protocol.end_update_body())[0] == 200


@pytest.mark.parametrize("kind", ["tensor", "broadcast"])
def test_transports_into_stand_in_give_the_new_models_logprobs(stand_ins, kind):
    """CPU shared memory into a --tp-size 2 server (a payload per rank) and a gloo broadcast into a
    --tp-size 1 server, through sync_weights' session, twice: after each sync the server's
    log-probs are those of the model just sent."""
    from helpers import hf_token_logprobs
    from megatron_nft.rollout import SamplingParams
    from megatron_nft.rollout.servers import free_ports
    from megatron_nft.rollout.sglang_client import SGLangEngine

    if kind == "tensor":
        url, transport = stand_ins["tp2"], CudaIpcTransport(ranks_per_server=2, device="cpu")
    else:
        url, transport = stand_ins["tp1"], NcclBroadcastTransport("127.0.0.1", free_ports(1)[0], backend="gloo")
    engine = SGLangEngine([url], transport=transport, bucket_bytes=BUCKET_BYTES)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    for version, seed in ((4, 11), (5, 12)):
        _, model = random_qwen2(seed=seed)
        engine.update_weights(model.named_parameters(), version)
        assert engine.last_sync.num_buckets >= 4
        for c in engine.generate(prompts, SamplingParams(max_new_tokens=6, n=2, seed=version)):
            seq = torch.tensor([prompts[c.prompt_index] + c.token_ids])
            with torch.no_grad():
                expected = hf_token_logprobs(model, seq)[0, len(prompts[c.prompt_index]) - 1 : -1]
            assert c.weight_version == version
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)
    transport.close()


def test_transports_refuse_servers_sglang_would_refuse(stand_ins):
    """--dp-size 2, or a --tp-size other than the ranks fed: refused in one line before the servers
    are paused; a broadcast the server will not join (no session) fails at once instead of hanging."""
    import time

    from megatron_nft.errors import ConfigError
    from megatron_nft.rollout.control import ServerError
    from megatron_nft.rollout.servers import free_ports
    from megatron_nft.rollout.weight_sync import sync_weights

    _, model = random_qwen2(seed=5)
    with pytest.raises(ConfigError, match=r"runs --dp-size 2, .*use rollout.weight_transport=disk"):
        sync_weights([stand_ins["dp2"]], model.named_parameters(), 1, CudaIpcTransport(device="cpu"))
    with pytest.raises(ConfigError, match=r"rollout.server_tp_size=1: .* runs --tp-size 2; set rollout.server_tp_size=2"):
        sync_weights([stand_ins["tp2"]], model.named_parameters(), 1, CudaIpcTransport(device="cpu"))
    transport = NcclBroadcastTransport("127.0.0.1", free_ports(1)[0], backend="gloo", group_name="no_session")
    start = time.monotonic()
    with pytest.raises(ServerError, match="between begin_weight_update"):
        transport.send([stand_ins["tp1"]], iter_buckets(model.named_parameters(), BUCKET_BYTES), 1, SyncReport(1))
    assert time.monotonic() - start < 30


def test_stage_shards_load_as_one_version(stand_ins, tmp_path):
    """The per-stage disk path in one process: two "stages" write their own shards into the plan's
    directory, rank 0's commit indexes them and the server loads the whole version (its log-probs
    are the model's); a tensor two stages sent, or a failed stage, loads nothing and leaves no
    directory; an engine without per-stage sends (the in-process one) gets None (the rank-0 stream)."""
    from helpers import hf_token_logprobs
    from megatron_nft.model.hf_io import hf_weight_map
    from megatron_nft.rollout import LocalEngine, SamplingParams
    from megatron_nft.rollout.sglang_client import SGLangEngine
    from megatron_nft.rollout.weight_sync import StageResult, sync_from_stages, write_stage

    transport = DiskTransport(tmp_path / "sync")
    engine = SGLangEngine([stand_ins["tp1"]], transport=transport, bucket_bytes=BUCKET_BYTES)
    config, model = random_qwen2(seed=31)
    params = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    half = len(params) // 2
    plan = engine.stage_plan(6)
    results = [write_stage(plan, 1, iter(params[half:])), write_stage(plan, 0, iter(params[:half]))]
    report = engine.load_stages(plan, results)
    weight_map = hf_weight_map(transport.version_dir(6))
    assert sorted(weight_map) == sorted(n for n, _ in params)
    assert {f.split("-")[1] for f in weight_map.values()} == {"pp000", "pp001"}
    assert report.total_bytes == sum(tensor_bytes(t) for _, t in params) and report.num_tensors == len(params)
    assert report.num_buckets == len(set(weight_map.values())) >= 4 and report.max_bucket_bytes <= BUCKET_BYTES * 2
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    for c in engine.generate(prompts, SamplingParams(max_new_tokens=6, n=2, seed=6)):
        seq = torch.tensor([prompts[c.prompt_index] + c.token_ids])
        with torch.no_grad():
            expected = hf_token_logprobs(model, seq)[0, len(prompts[c.prompt_index]) - 1 : -1]
        assert c.weight_version == 6
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)

    for stages, error, message in [
        ([params[: half + 1], params[half:]], ValueError, r"weight sync v7: stage 1 sent '.*', which another stage sent too"),
        ([params[:half], None], RuntimeError, r"weight sync v7: stage 1 \(rank 3\): OSError: disk full"),
    ]:
        plan = engine.stage_plan(7)
        results = [write_stage(plan, 0, iter(stages[0])),
                   write_stage(plan, 1, iter(stages[1])) if stages[1] else StageResult(1, error="stage 1 (rank 3): OSError: disk full")]
        with pytest.raises(error, match=message):
            engine.load_stages(plan, results)
        assert sorted(p.name for p in (tmp_path / "sync").iterdir()) == ["weights_v000006"]
        assert engine.weight_version == 6 and engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))[0].weight_version == 6

    # one process, one stage: the whole path of sync_from_stages, with its agreement collectives as no-ops
    report = sync_from_stages(engine, lambda: iter(params), stage=0, source=True, version=8)
    assert report.version == 8 and report.seconds > 0 and engine.weight_version == 8
    assert sorted(p.name for p in (tmp_path / "sync").iterdir()) == ["weights_v000008"]
    calls = []
    local = LocalEngine(config)
    assert sync_from_stages(local, lambda: calls.append(1), stage=0, source=True, version=9) is None
    assert calls == [] and local.weight_version == -1 and engine.weight_version == 8  # nothing was sent
    transport.close()


def test_seeds_need_deterministic_inference(stand_ins):
    """As in SGLang, a request's sampling_seed is used only by a server started with
    --enable-deterministic-inference (what the launches pass, so resumes re-draw the same answers)."""
    from megatron_nft.rollout import SamplingParams
    from megatron_nft.rollout.sglang_client import SGLangEngine

    params = SamplingParams(max_new_tokens=12, n=4, seed=77)
    draws = {}
    for name in ("tp1", "dp2"):
        engine = SGLangEngine([stand_ins[name]])
        draws[name] = [[c.token_ids for c in engine.generate([[1, 2, 3]], params)] for _ in range(2)]
    assert draws["tp1"][0] == draws["tp1"][1]
    assert draws["dp2"][0] != draws["dp2"][1]


# ----------------------------------------------------------------------------------------------------
# actor (TP=2, PP=2 over gloo) -> local HTTP server -> the same log-probs
# ----------------------------------------------------------------------------------------------------

BUCKET_BYTES = 64 * 1024


def _sync_worker(rank, world_size, config, state, url, sync_dir, prompts):
    """Version 1 through today's rank-0 stream (hf_tensors), version 2 through the trainer's sync
    (every stage writes its own shards), version 3 with stage 1's sender failing part-way."""
    import dataclasses

    import torch.distributed as dist

    from megatron_nft.actor import Actor
    from megatron_nft.config import AlgoConfig, OptimConfig
    from megatron_nft.model.hf_io import hf_weight_map
    from megatron_nft.model.qwen2 import shape_from_hf
    from megatron_nft.rollout import SamplingParams
    from megatron_nft.rollout.sglang_client import SGLangEngine
    from megatron_nft.rollout.weight_sync import sync_from_stages
    from megatron_nft.trainer import sync_weights

    actor = Actor(shape_from_hf(config), tp=2, pp=2, micro_batch_size=4,
                  optim=OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0), algo=AlgoConfig(name="nft", agg="token_mean"))
    actor.load_hf(lambda n: state[n])
    transport = DiskTransport(sync_dir)
    engine = SGLangEngine([url], transport=transport, bucket_bytes=BUCKET_BYTES) if rank == 0 else None
    bundle = actor.bundle
    out = {"stage": bundle.pp_rank, "source": bundle.stage_source}
    previous = None
    for version in (1, 2):
        box = [None]
        if version == 1:
            if rank == 0:
                meter = LiveBytes()
                engine.update_weights(meter.watch(actor.hf_tensors()), version)
            else:
                assert list(actor.hf_tensors()) == []  # this rank's part of the gather is done within the call
        else:
            sync_weights(actor, engine, version)
        if rank == 0:
            completions = engine.generate(prompts, SamplingParams(max_new_tokens=8, n=2, seed=version))
            box = [[(prompts[c.prompt_index], c.token_ids, c.logprobs, c.weight_version) for c in completions]]
        dist.broadcast_object_list(box, src=0)
        rows = box[0]
        width = max(len(p) + len(t) for p, t, _, _ in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width)
        engine_lp = torch.zeros(len(rows), width)
        for i, (p, t, lp, _) in enumerate(rows):
            tokens[i, : len(p) + len(t)] = torch.tensor(p + t)
            span = slice(len(p) - 1, len(p) - 1 + len(t))  # position s scores token s+1
            mask[i, span] = 1
            engine_lp[i, span] = torch.tensor(lp)
        actor_lp, _ = actor.compute_logprobs({"tokens": tokens})
        changed = None
        if previous is not None:  # the previous version's rows under the current weights
            again, _ = actor.compute_logprobs({"tokens": previous[0]})
            changed = float(((again - previous[1]).abs() * previous[2]).max())
        if rank == 0:
            out[version] = {
                "max_abs_diff": float(((actor_lp - engine_lp).abs() * mask).max()),
                "versions": sorted({v for *_, v in rows}),
                "report": dataclasses.asdict(engine.last_sync),
                "changed": changed,
                "files": sorted(set(hf_weight_map(transport.version_dir(version)).values())),
            }
            if version == 1:
                out[version] |= {"peak": meter.peak, "largest": meter.largest, "total": meter.total}
        previous = (tokens, actor_lp, mask)
        if version == 1:  # a real optimizer step, so that version 2 carries different weights
            rewards = torch.tensor([float(i % 2) for i in range(len(rows))])
            actor.train_step({"tokens": tokens, "loss_mask": mask, "old_logprobs": actor_lp - 0.3,
                              "rewards": rewards, "correct_rate": torch.full((len(rows),), 0.5)})

    def stage_1_fails():
        # stage 1's sender hands one tensor twice: its own bucketing refuses it part-way through the
        # stream, and the stage's other tensor-parallel rank must still finish its gathers
        stream = bundle.stage_tensors()

        def doubled():
            for name, tensor in stream:
                yield name, tensor
                if bundle.pp_rank == 1:
                    yield name, tensor

        return doubled()

    try:
        sync_from_stages(engine, stage_1_fails, stage=bundle.pp_rank, source=bundle.stage_source, version=3)
        out["failure"] = None
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        out["failure"] = f"{type(e).__name__}: {e}"
    if rank == 0:
        out["left"] = sorted(p.name for p in Path(sync_dir).iterdir())
        out["after_failure"] = (engine.weight_version, engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))[0].weight_version)
    return out


@pytest.mark.slow
def test_tp2_pp2_actor_sync_to_local_http_server(tmp_path):
    """Today's rank-0 stream and the per-stage path (each stage's source writes its own shards) give
    the server the actor's log-probs (|Δ| < 1e-5); a stage that fails part-way fails the sync on
    every rank, loads nothing and leaves no directory."""
    from megatron_nft.rollout.control import wait_healthy
    from megatron_nft.rollout.servers import free_ports, launch_servers, local_server_command

    config, model = random_qwen2(seed=3)
    config.save_pretrained(tmp_path / "model")  # config only: the server starts on random weights
    state = {k: v.clone() for k, v in model.state_dict().items()}
    [port] = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    cmd = local_server_command(str(tmp_path / "model"), port=port, load_format="dummy", threads=1)
    [server] = launch_servers([(cmd, url)], tmp_path / "logs")
    try:
        wait_healthy([url], timeout_s=300, alive=lambda _: server.check_alive())
        prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
        ranks = run_distributed(_sync_worker, 4, config, state, url, str(tmp_path / "sync"), prompts, timeout_s=900)
    finally:
        server.stop()
    results = ranks[0]
    assert [(r["stage"], r["source"]) for r in ranks] == [(0, True), (0, False), (1, True), (1, False)]
    total = sum(tensor_bytes(t) for t in state.values())
    for version in (1, 2):
        r = results[version]
        assert r["versions"] == [version]
        assert r["max_abs_diff"] < 1e-5, (version, r["max_abs_diff"])
        report = r["report"]
        assert report["version"] == version and report["seconds"] > 0 and report["total_bytes"] == total
        assert report["num_tensors"] == len(state) and report["num_buckets"] >= 4
        assert report["max_bucket_bytes"] <= BUCKET_BYTES + max(tensor_bytes(t) for t in state.values())
    # today's path: one sender, which held at most one bucket plus the tensor that closed it
    r = results[1]
    assert r["total"] == total and r["peak"] <= BUCKET_BYTES + r["largest"] < r["total"] / 2, r
    assert all(f.startswith("model-0") for f in r["files"])
    # the trainer's path: both stages wrote their own shards
    assert {f.split("-")[1] for f in results[2]["files"]} == {"pp000", "pp001"}
    assert results[2]["changed"] > 1e-3  # the optimizer step moved the policy, and v2 followed it
    for r in ranks:
        assert "stage 1 (rank 2): ValueError: weight sync: tensor" in r["failure"] and "appears twice" in r["failure"], r["failure"]
    assert results["left"] == ["weights_v000002"] and results["after_failure"] == (2, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["nccl", "cuda_ipc"])
def test_gpu_transports_to_real_sglang(transport, tmp_path):
    """NCCL broadcast and CUDA IPC into a real SGLang server: its log-probs then match the new model."""
    from helpers import hf_token_logprobs
    from megatron_nft.rollout import SamplingParams
    from megatron_nft.rollout.servers import free_ports, launch_servers, sglang_command
    from megatron_nft.rollout.sglang_client import SGLangEngine

    config, model_a = random_qwen2(seed=0)
    _, model_b = random_qwen2(seed=1)
    model_a.save_pretrained(tmp_path / "model")
    port, master_port = free_ports(2)
    url = f"http://127.0.0.1:{port}"
    cmd = sglang_command(str(tmp_path / "model"), port=port, mem_fraction_static=0.3, dtype="float32",
                         extra_args=["--skip-tokenizer-init"])
    sender = (NcclBroadcastTransport("127.0.0.1", master_port) if transport == "nccl" else CudaIpcTransport())
    engine = SGLangEngine([url], servers=launch_servers([(cmd, url)], tmp_path / "logs"), transport=sender,
                          bucket_bytes=64 * 1024)
    try:
        engine.wait_ready(timeout_s=900)
        engine.update_weights(((n, p.cuda()) for n, p in model_b.named_parameters()), version=3)
        prompts = [[1, 2, 3], [4, 5, 6, 7]]
        for c in engine.generate(prompts, SamplingParams(max_new_tokens=8, n=2)):
            seq = torch.tensor([prompts[c.prompt_index] + c.token_ids])
            expected = hf_token_logprobs(model_b, seq)[0, len(prompts[c.prompt_index]) - 1 : -1]
            assert c.weight_version == 3
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=2e-3, rtol=0)
    finally:
        engine.close()


def test_launched_servers_take_gpus_the_trainer_does_not_use():
    """The trainer's local ranks hold GPUs 0..L-1; servers default to the ones after, an explicit
    rollout.server_gpus that overlaps them is refused in one line (it ran out of memory before)."""
    from megatron_nft.errors import ConfigError
    from megatron_nft.rollout.servers import gpu_groups

    visible = "0,1,2,3,4,5,6,7"
    assert gpu_groups(2, 2, trainer_gpus=4, visible=visible) == ["4,5", "6,7"]
    assert gpu_groups(2, 1, trainer_gpus=2, server_gpus=[7, 5], visible="a,b,c,d,e,f,g,h") == ["h", "f"]
    for kwargs, message in [
        (dict(trainer_gpus=4, server_gpus=[3, 4]), r"rollout.server_gpus=\[3, 4\]: GPU 3 is used by trainer local rank 3"),
        (dict(trainer_gpus=7), r"the GPUs after the trainer.s 7: GPU 8 does not exist"),
        (dict(trainer_gpus=0, server_gpus=[1]), r"need 2 GPUs, 1 given"),
        (dict(trainer_gpus=0, server_gpus=[1, 1]), r"a GPU is listed twice"),
    ]:
        with pytest.raises(ConfigError, match=message):
            gpu_groups(1, 2, visible=visible, **kwargs)


@pytest.mark.gpu
def test_cuda_ipc_into_stand_in_on_gpu(stand_ins):
    """The real CUDA IPC path: handles of GPU tensors, device named by UUID, opened by the stand-in
    server process (which maps UUIDs to its GPUs as SGLang does); its log-probs then are the model's."""
    from helpers import hf_token_logprobs
    from megatron_nft.rollout import SamplingParams
    from megatron_nft.rollout.sglang_client import SGLangEngine

    engine = SGLangEngine([stand_ins["tp2"]], transport=CudaIpcTransport(ranks_per_server=2), bucket_bytes=BUCKET_BYTES)
    _, model = random_qwen2(seed=21)
    engine.update_weights(((n, p.detach().cuda()) for n, p in model.named_parameters()), 8)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    for c in engine.generate(prompts, SamplingParams(max_new_tokens=6, n=2)):
        seq = torch.tensor([prompts[c.prompt_index] + c.token_ids])
        with torch.no_grad():
            expected = hf_token_logprobs(model, seq)[0, len(prompts[c.prompt_index]) - 1 : -1]
        assert c.weight_version == 8
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-5, rtol=0)
