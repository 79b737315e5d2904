"""Weight sync: bucketing, the disk transport's atomic writes, the CUDA-IPC payload, and a TP=2/PP=2
gloo actor synced through the local HTTP server, whose log-probs must then equal the actor's.

Payload schemas (all transports) are checked against SGLang's io_struct in test_sglang_client.py,
where the one SGLang child process of the suite runs; so is the broadcast group's handshake.
"""

from __future__ import annotations

import pickle
import weakref

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


def test_cuda_ipc_payload_round_trips():
    """The /update_weights_from_tensor payload unpickles (same process: CPU tensors travel as shared
    memory here, CUDA tensors as IPC handles on a GPU) to the same names and values."""
    import base64

    bucket = [("a", torch.randn(3, 2)), ("b", torch.arange(4, dtype=torch.bfloat16))]
    body = CudaIpcTransport(ranks_per_server=3, device="cpu").bucket_body(bucket, 9)
    assert len(body["serialized_named_tensors"]) == 3 and body["weight_version"] == "9"
    restored = pickle.loads(base64.b64decode(serialize_named_tensors(bucket)))
    assert [n for n, _ in restored] == ["a", "b"]
    for (_, want), (_, got) in zip(bucket, restored):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_nccl_group_layout():
    t = NcclBroadcastTransport("10.0.0.1", 29600, ranks_per_server=2, group_name="g")
    bodies = t.init_bodies(["http://a", "http://b", "http://c"])
    assert [b["rank_offset"] for b in bodies] == [1, 3, 5] and {b["world_size"] for b in bodies} == {7}
    body = t.bucket_body([("x", torch.zeros(2, 3, dtype=torch.bfloat16)), ("y", torch.zeros(4))], "g", 2)
    assert (body["names"], body["dtypes"], body["shapes"]) == (["x", "y"], ["bfloat16", "float32"], [[2, 3], [4]])


# ----------------------------------------------------------------------------------------------------
# actor (TP=2, PP=2 over gloo) -> local HTTP server -> the same log-probs
# ----------------------------------------------------------------------------------------------------

BUCKET_BYTES = 64 * 1024


def _sync_worker(rank, world_size, config, state, url, sync_dir, prompts):
    import torch.distributed as dist

    from megatron_nft.actor import Actor
    from megatron_nft.config import AlgoConfig, OptimConfig
    from megatron_nft.model.qwen2 import shape_from_hf
    from megatron_nft.rollout import SamplingParams
    from megatron_nft.rollout.sglang_client import SGLangEngine

    actor = Actor(shape_from_hf(config), tp=2, pp=2, micro_batch_size=4,
                  optim=OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0), algo=AlgoConfig(name="nft", agg="token_mean"))
    actor.load_hf(lambda n: state[n])
    engine = SGLangEngine([url], transport=DiskTransport(sync_dir), bucket_bytes=BUCKET_BYTES) if rank == 0 else None
    out = {}
    previous = None
    for version in (1, 2):
        box = [None]
        if rank == 0:
            meter = LiveBytes()
            engine.update_weights(meter.watch(actor.hf_tensors()), version)
            completions = engine.generate(prompts, SamplingParams(max_new_tokens=8, n=2, seed=version))
            box = [[(prompts[c.prompt_index], c.token_ids, c.logprobs, c.weight_version) for c in completions]]
        else:
            for _ in actor.hf_tensors():  # every rank takes part in the gather
                pass
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
                "report": engine.last_sync,
                "peak": meter.peak, "largest": meter.largest, "total": meter.total,
                "changed": changed,
            }
        previous = (tokens, actor_lp, mask)
        if version == 1:  # a real optimizer step, so that version 2 carries different weights
            rewards = torch.tensor([float(i % 2) for i in range(len(rows))])
            actor.train_step({"tokens": tokens, "loss_mask": mask, "old_logprobs": actor_lp - 0.3,
                              "rewards": rewards, "correct_rate": torch.full((len(rows),), 0.5)})
    return out


@pytest.mark.slow
def test_tp2_pp2_actor_sync_to_local_http_server(tmp_path):
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
        results = run_distributed(_sync_worker, 4, config, state, url, str(tmp_path / "sync"), prompts, timeout_s=900)[0]
    finally:
        server.stop()
    for version, r in results.items():
        assert r["versions"] == [version]
        assert r["max_abs_diff"] < 1e-5, (version, r["max_abs_diff"])
        report = r["report"]
        assert report.version == version and report.seconds > 0 and report.total_bytes == r["total"]
        assert report.num_tensors == len(state) and report.num_buckets >= 4
        assert report.max_bucket_bytes <= max(BUCKET_BYTES, r["largest"])
        # the sender held at most one bucket plus the tensor that closed it, a fraction of the model
        assert r["peak"] <= BUCKET_BYTES + r["largest"] < r["total"] / 2, r
    assert results[2]["changed"] > 1e-3  # the optimizer step moved the policy, and v2 followed it


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
