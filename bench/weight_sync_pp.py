"""Weight sync at PP=2: the rank-0 stream against every stage sending its own tensors.

    python bench/weight_sync_pp.py [--transport disk|nccl|cuda_ipc] [--hidden 1024 --layers 8 ...] [--repeats 3]

Two gloo ranks hold a random Qwen2-shaped model at PP=2 (megatron-core's GPTModel stages, built by
ModelBundle); a local HTTP server (SGLang's API, the server process the `local_http` engine runs)
starts from the same config on dummy weights. Each repeat syncs twice, alternating, into the same
server through the same kind of transport and bucket size, after one untimed warm-up sync of each:
  rank0   today's path: ModelBundle.hf_tensors() sends every tensor of stage 1 to global rank 0, one
          at a time with a pickled metadata broadcast each, and rank 0 sends everything;
  stages  weight_sync.sync_from_stages (what the trainer runs): each stage's source rank sends its
          own tensors (disk: writes its shards, both stages at once, rank 0 indexes them; cuda_ipc:
          posts CPU shared-memory payloads, both at once; nccl: broadcasts over its own gloo group,
          the stages in turn).
Both end with the server holding the whole version (disk: /update_weights_from_disk, the same work
in both; the session transports: /end_weight_update). Times are wall clock on rank 0 from a barrier before the sync to the server's answer;
printed: each repeat, the medians, the ratio, the bytes, the machine and its load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def qwen2_config(args):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       max_position_embeddings=512, tie_word_embeddings=False)


def make_transport(kind: str, sync_dir: str, port: int):
    """The CPU forms of the three transports: gloo for NCCL, CPU shared memory for CUDA IPC."""
    from megatron_nft.rollout.weight_sync import CudaIpcTransport, DiskTransport, NcclBroadcastTransport

    if kind == "disk":
        return DiskTransport(sync_dir)
    if kind == "nccl":
        return NcclBroadcastTransport("127.0.0.1", port, backend="gloo")
    return CudaIpcTransport(device="cpu")


def worker(rank, world_size, config_dict, url, sync_dir, repeats, bucket_mb, kind, ports):
    from transformers import Qwen2Config

    from megatron_nft import runtime
    from megatron_nft.model.bundle import ModelBundle
    from megatron_nft.model.qwen2 import shape_from_hf
    from megatron_nft.rollout.sglang_client import SGLangEngine
    from megatron_nft.rollout.weight_sync import sync_from_stages

    bundle = ModelBundle.build(shape_from_hf(Qwen2Config(**config_dict)), pp=2, seed=0)
    # one engine per path (the one-stream and the per-stage NCCL groups each keep their own rendezvous)
    engines = ({path: SGLangEngine([url], transport=make_transport(kind, f"{sync_dir}/{path}", port),
                                   bucket_bytes=bucket_mb * 1024**2) for path, port in zip(("rank0", "stages"), ports)}
               if rank == 0 else {})
    times = {"rank0": [], "stages": []}
    total_bytes = {}

    def sync(path, version):
        engine = engines.get(path)
        if path == "rank0":
            tensors = bundle.hf_tensors()  # the other ranks' part is done within this call
            if engine is not None:
                engine.update_weights(tensors, version)
        else:
            sync_from_stages(engine, bundle.stage_tensors, stage=bundle.pp_rank, source=bundle.stage_source,
                             version=version, num_stages=bundle.pp)
        if engine is not None:
            assert engine.weight_version == version
            total_bytes[path] = engine.last_sync.total_bytes

    # untimed: first-call costs (the server's first load, joining groups, lazy imports) count for neither
    version = 0
    for path in ("rank0", "stages"):
        version += 1
        sync(path, version)
    for _ in range(repeats):
        for path in ("rank0", "stages"):
            version += 1
            runtime.barrier()
            start = time.perf_counter()
            sync(path, version)
            times[path].append(time.perf_counter() - start)
    for engine in engines.values():
        engine.close()
    return {"times": times, "bytes": total_bytes, "stage_params": sum(p.numel() for p in bundle.model.parameters())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=512, help="rollout.weight_bucket_mb (the default config's)")
    ap.add_argument("--transport", choices=("disk", "nccl", "cuda_ipc"), default="disk",
                    help="rollout.weight_transport, in its CPU form (nccl: gloo groups; cuda_ipc: CPU shared memory)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed after")
    args = ap.parse_args(argv)

    from megatron_nft.rollout.control import wait_healthy
    from megatron_nft.rollout.servers import free_ports, launch_servers, local_server_command
    from megatron_nft.testing import run_distributed

    config = qwen2_config(args)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        config.save_pretrained(tmp / "model")  # config only: the server starts on dummy weights
        port, *nccl_ports = free_ports(3)
        url = f"http://127.0.0.1:{port}"
        cmd = local_server_command(str(tmp / "model"), port=port, load_format="dummy", threads=1)
        load_before = os.getloadavg()
        [server] = launch_servers([(cmd, url)], tmp / "logs")
        try:
            wait_healthy([url], timeout_s=600, alive=lambda _: server.check_alive())
            ranks = run_distributed(worker, 2, config.to_dict(), url, str(tmp / "sync"), args.repeats, args.bucket_mb,
                                    args.transport, nccl_ports, timeout_s=3600)
        finally:
            server.stop()
        load_after = os.getloadavg()
    out = ranks[0]
    old, new = statistics.median(out["times"]["rank0"]), statistics.median(out["times"]["stages"])
    nbytes = out["bytes"]["stages"]
    assert out["bytes"]["rank0"] == nbytes
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (1 min)")
    print(f"model: hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, vocab {args.vocab}, fp32; "
          f"{nbytes / 1e6:.0f} MB per sync; stage params {[r['stage_params'] for r in ranks]}; "
          f"PP=2 on 2 gloo ranks, buckets {args.bucket_mb} MiB, {args.transport} transport into 1 local HTTP server")
    for path, label in (("rank0", "rank-0 stream (today)"), ("stages", "every stage its own")):
        runs = ", ".join(f"{t:.2f}" for t in out["times"][path])
        print(f"{label:24s} median {statistics.median(out['times'][path]):6.2f} s  (runs: {runs})")
    print(f"ratio today / per-stage: {old / new:.2f}x; per-stage {nbytes / new / 1e6:.0f} MB/s, today {nbytes / old / 1e6:.0f} MB/s")


if __name__ == "__main__":
    main()
