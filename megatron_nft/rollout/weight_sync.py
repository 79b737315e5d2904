"""Weight sync: the actor's (HF name, tensor) stream -> rollout servers, in buckets of bounded size.

    report = sync_weights(urls, actor.hf_tensors(), version=step, transport=DiskTransport(shared_dir))

The stream is cut into buckets of at most `bucket_bytes` (a tensor larger than that travels alone),
so the sender never holds more than one bucket plus the tensor that closed it, whatever the model
size. Around the update every server is paused (running requests are retracted and recomputed
afterwards) and its cache flushed once at the end; the version is stamped by the servers with the
weights, and every /generate answer reports it back (Completion.weight_version).

Transports (SGLang's three ways in):
  DiskTransport           safetensors shards written under a directory both sides see, renamed into
                          place when complete, then /update_weights_from_disk. Always works (the
                          local HTTP server takes it too); costs a write and a read of the model.
  NcclBroadcastTransport  /init_weights_update_group once, then per bucket
                          /update_weights_from_distributed while rank 0 broadcasts the tensors.
                          Needs GPUs on both sides and a reachable master port.
  CudaIpcTransport        /update_weights_from_tensor with CUDA IPC handles of tensors the trainer
                          keeps alive until the server has copied them: servers on the same node.

This module only consumes an iterator, so it needs nothing from the actor.
"""

from __future__ import annotations

import abc
import base64
import io
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from megatron_nft.rollout import protocol
from megatron_nft.rollout.control import post_all

Bucket = list[tuple[str, torch.Tensor]]
DEFAULT_BUCKET_BYTES = 512 * 1024**2


@dataclass
class SyncReport:
    """What one sync moved and how long it took (the trainer logs these)."""

    version: int
    seconds: float = 0.0
    num_tensors: int = 0
    total_bytes: int = 0
    num_buckets: int = 0
    max_bucket_bytes: int = 0  # the largest bucket staged at once: the sender's extra memory


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Groups consecutive tensors into buckets of at most `bucket_bytes` (one larger tensor: alone).

    A bucket is yielded as soon as the next tensor would overflow it, and the caller drops it before
    asking for the next, so at most one bucket plus one tensor is alive here.
    """
    if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be an integer >= 1, got {bucket_bytes!r}")
    bucket: Bucket = []
    size = 0
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"weight sync: tensor {name!r} appears twice in the stream")
        seen.add(name)
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


class WeightTransport(abc.ABC):
    """Moves buckets to the servers and has them load the weights."""

    name: str

    @abc.abstractmethod
    def send(self, urls: list[str], buckets: Iterator[Bucket], version: int, report: SyncReport) -> None:
        """Ships every bucket (updating `report` as they go) and stamps `version` on the servers."""

    def close(self) -> None:
        """Releases what the transport holds (files, process groups)."""


def sync_weights(
    urls: list[str],
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    version: int,
    transport: WeightTransport,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> SyncReport:
    """Pauses the servers, sends the weights, flushes their caches and lets them continue."""
    if not urls:
        raise ValueError("sync_weights: no servers to update")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"sync_weights: version must be an integer, got {version!r}")
    start = time.perf_counter()
    report = SyncReport(version=version)
    post_all(urls, "/pause_generation", protocol.pause_body())
    try:
        transport.send(urls, _measured(iter_buckets(named_tensors, bucket_bytes), report), version, report)
        # A prefix cache built by the old weights would serve stale KV to new requests.
        post_all(urls, "/flush_cache", None)
    finally:
        post_all(urls, "/continue_generation", protocol.continue_body())
    report.seconds = time.perf_counter() - start
    return report


def _measured(buckets: Iterator[Bucket], report: SyncReport) -> Iterator[Bucket]:
    for bucket in buckets:
        nbytes = sum(tensor_bytes(t) for _, t in bucket)
        report.num_buckets += 1
        report.num_tensors += len(bucket)
        report.total_bytes += nbytes
        report.max_bucket_bytes = max(report.max_bucket_bytes, nbytes)
        yield bucket
        del bucket  # before the next bucket is built: one bucket alive at a time


# ----------------------------------------------------------------------------------------------------
# disk
# ----------------------------------------------------------------------------------------------------


class DiskTransport(WeightTransport):
    """Safetensors shards (one per bucket) + an HF index under `root/weights_v<version>`.

    The directory is written under a temporary name and renamed when complete, so a server never
    loads a half-written version; older versions are removed once the servers have loaded the new
    one. `root` must be visible to every server under the same path (a shared file system on a
    cluster).
    """

    name = "disk"

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def version_dir(self, version: int) -> Path:
        return self.root / f"weights_v{version:06d}"

    def send(self, urls, buckets, version, report):
        from safetensors.torch import save_file

        final = self.version_dir(version)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        weight_map: dict[str, str] = {}
        total = 0
        try:
            # no enumerate(): its cached result tuple would keep the previous bucket alive
            for bucket in buckets:
                fname = f"model-{len(set(weight_map.values())):05d}.safetensors"
                shard = {name: t.detach().to("cpu").contiguous() for name, t in bucket}
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
                total += sum(tensor_bytes(t) for t in shard.values())
                del shard, bucket
            index = {"metadata": {"total_size": total, "weight_version": version}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        post_all(urls, "/update_weights_from_disk", protocol.update_from_disk_body(str(final.resolve()), version))
        for old in self.root.glob("weights_v*"):
            if old != final and not old.name.startswith(f"{final.name}.tmp"):
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        for old in self.root.glob("weights_v*"):
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# NCCL broadcast
# ----------------------------------------------------------------------------------------------------


def init_weight_update_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str, backend: str):
    """Joins (as `rank`) the process group the servers build in /init_weights_update_group.

    The server side (sglang.srt.utils.init_custom_process_group) rendezvouses over
    tcp://master_address:master_port, prefixes the store with the group name and builds the group
    with torch's process-group helper, outside any default group. The store keys only meet if we
    build ours the same way, so this follows the same steps; rank 0 (the trainer) hosts the store.
    """
    from datetime import timedelta

    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, rendezvous

    timeout = timedelta(minutes=10)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name, timeout=timeout)
    return group


class NcclBroadcastTransport(WeightTransport):
    """Broadcasts each bucket from trainer rank 0 to every server rank of a dedicated group.

    `ranks_per_server` is each server's tensor-parallel size (every server rank receives the full
    tensors and keeps its shard). `backend="gloo"` runs the same protocol on CPU.
    """

    name = "nccl"

    def __init__(self, master_address: str, master_port: int, *, ranks_per_server: int = 1,
                 group_name: str = "megatron_nft_weight_sync", backend: str = "nccl", device: str | None = None):
        self.master_address, self.master_port = master_address, int(master_port)
        self.ranks_per_server, self.group_name, self.backend = int(ranks_per_server), group_name, backend
        self.device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
        self._group = None
        self._urls: list[str] | None = None

    def init_bodies(self, urls: list[str]) -> list[dict]:
        """One /init_weights_update_group body per server: trainer rank 0, then each server's ranks."""
        world = 1 + self.ranks_per_server * len(urls)
        return [
            protocol.init_group_body(self.master_address, self.master_port, 1 + i * self.ranks_per_server, world,
                                     self.group_name, self.backend)
            for i in range(len(urls))
        ]

    @staticmethod
    def bucket_body(bucket: Bucket, group_name: str, version: int) -> dict:
        names = [n for n, _ in bucket]
        dtypes = [str(t.dtype).removeprefix("torch.") for _, t in bucket]
        shapes = [tuple(t.shape) for _, t in bucket]
        return protocol.update_from_distributed_body(names, dtypes, shapes, group_name, version)

    def _connect(self, urls: list[str]) -> None:
        if self._group is not None and self._urls == urls:
            return
        if self._group is not None:
            raise RuntimeError("NcclBroadcastTransport: the set of servers changed; build a new transport")
        bodies = self.init_bodies(urls)
        # The servers block in /init_weights_update_group until rank 0 joins: post from threads.
        posts = [_post_in_thread(u, "/init_weights_update_group", b) for u, b in zip(urls, bodies)]
        self._group = init_weight_update_group(self.master_address, self.master_port, 0, bodies[0]["world_size"],
                                               self.group_name, self.backend)
        for post in posts:
            post.result()
        self._urls = list(urls)

    def send(self, urls, buckets, version, report):
        self._connect(urls)
        for bucket in buckets:
            body = self.bucket_body(bucket, self.group_name, version)
            # Each server posts the receive side and waits in broadcast; we feed it in order.
            posts = [_post_in_thread(u, "/update_weights_from_distributed", body) for u in urls]
            for _, tensor in bucket:
                self._group.broadcast(tensor.detach().to(self.device).contiguous(), 0).wait()
            for post in posts:
                post.result()
            del bucket  # before the next bucket is built

    def close(self) -> None:
        self._group = None


class _PostThread:
    def __init__(self, url, path, body):
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(url, path, body), daemon=True)
        self._thread.start()

    def _run(self, url, path, body):
        try:
            post_all([url], path, body)
        except BaseException as e:  # noqa: BLE001 - re-raised in result()
            self._error = e

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error


def _post_in_thread(url: str, path: str, body: dict) -> _PostThread:
    return _PostThread(url, path, body)


# ----------------------------------------------------------------------------------------------------
# CUDA IPC
# ----------------------------------------------------------------------------------------------------


def serialize_named_tensors(bucket: Bucket) -> str:
    """SGLang's MultiprocessingSerializer format: a ForkingPickler dump of [(name, tensor)], base64.

    For CUDA tensors ForkingPickler writes CUDA IPC handles (torch.multiprocessing.reductions), so
    the receiving process maps the trainer's memory instead of copying bytes through HTTP.
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers the tensor reductions with ForkingPickler

    buffer = io.BytesIO()
    ForkingPickler(buffer).dump([(name, t.detach()) for name, t in bucket])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class CudaIpcTransport(WeightTransport):
    """/update_weights_from_tensor with CUDA IPC handles: servers on the trainer's node.

    Each bucket is copied to `device` and kept alive until every server has answered (the handles
    point at that memory). `ranks_per_server` copies of the payload go in each request, one per
    server tensor-parallel rank (each rank maps the full tensors and keeps its shard).
    """

    name = "cuda_ipc"

    def __init__(self, *, ranks_per_server: int = 1, device: str = "cuda"):
        self.ranks_per_server, self.device = int(ranks_per_server), torch.device(device)

    def bucket_body(self, bucket: Bucket, version: int) -> dict:
        payload = serialize_named_tensors(bucket)
        return protocol.update_from_tensor_body([payload] * self.ranks_per_server, version)

    def send(self, urls, buckets, version, report):
        for bucket in buckets:
            staged = [(n, t.detach().to(self.device).contiguous()) for n, t in bucket]
            del bucket
            post_all(urls, "/update_weights_from_tensor", self.bucket_body(staged, version))
            del staged
