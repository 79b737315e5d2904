"""Weight sync: the actor's (HF name, tensor) stream -> rollout servers, in buckets of bounded size.

    report = sync_weights(urls, actor.hf_tensors(), version=step, transport=DiskTransport(shared_dir))

The stream is cut into buckets of at most `bucket_bytes` (a tensor larger than that travels alone),
so the sender never holds more than one bucket plus the tensor that closed it, whatever the model
size. Around the update every server is paused (running requests are retracted and recomputed
afterwards) and its cache flushed once at the end; the version is stamped by the servers with the
weights, and every /generate answer reports it back (Completion.weight_version).

Transports (SGLang's three ways in):
  DiskTransport           safetensors shards written under a directory both sides see, renamed into
                          place when complete, then /update_weights_from_disk. Always works, with any
                          server --dp-size (the local HTTP server takes it too); costs a write and a
                          read of the model.
  NcclBroadcastTransport  /init_weights_update_group once, then per bucket
                          /update_weights_from_distributed while rank 0 broadcasts the tensors.
                          Needs GPUs on both sides and a reachable master port (gloo on CPU).
  CudaIpcTransport        /update_weights_from_tensor with CUDA IPC handles of tensors the trainer
                          keeps alive until the server has copied them: servers on the same node
                          (CPU shared memory with device="cpu").

SGLang 0.5.23 takes the last two only inside a weight-update session (/begin_weight_update ...
/end_weight_update; outside one it answers `success: false`, and for the broadcast it then never
joins, which would leave the sender waiting) and only from servers with --dp-size 1 (it asserts
dp_size == 1: HTTP 500). sync_weights therefore checks each server's /server_info first (dp_size 1,
tp_size = the ranks the transport feeds) and opens and closes the session around the buckets.

Per pipeline stage (`sync_from_stages`, what the trainer uses): each stage's source rank (tensor-,
data- and context-parallel rank 0 of the stage) sends its own stage's tensors, instead of sending
every tensor through global rank 0; rank 0 only plans and commits. Disk: every stage writes its own
shards into the version directory, all at once; rank 0 writes the index over them and has the
servers load the directory. CUDA IPC: every stage posts its own buckets (payloads of its own GPU,
named by device UUID), all at once, inside the session rank 0 opened. NCCL: one weight-update group
per stage, with the stage's source as group rank 0 (SGLang keeps several groups per server, keyed by
name, and broadcasts from group rank 0 only), the stages taking turns: a server handles one weight
request at a time, so servers that picked up two stages' buckets in different orders would each wait
in a broadcast the other has not joined (NCCL's ring needs every peer: a deadlock). The in-process
LocalEngine takes one stream gathered on rank 0 (`send`, `hf_tensors`).

This module only consumes iterators, so it needs nothing from the actor.
"""

from __future__ import annotations

import abc
import base64
import functools
import io
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from megatron_nft.rollout import protocol
from megatron_nft.rollout.control import get_all, post_all, post_each

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
    # True: SGLang serves this transport's routes only inside a weight-update session and only from
    # servers with --dp-size 1, fed with one receiving rank per server tensor-parallel rank.
    needs_session: bool = False
    ranks_per_server: int = 1

    def check_servers(self, urls: list[str]) -> None:
        """Refuses, before anything is paused or sent, servers this transport cannot update."""
        if self.needs_session:
            check_single_dp(urls, self.name, self.ranks_per_server)

    @abc.abstractmethod
    def send(self, urls: list[str], buckets: Iterator[Bucket], version: int, report: SyncReport) -> None:
        """Ships every bucket (updating `report` as they go) and stamps `version` on the servers."""

    def stage_plan(self, version: int, bucket_bytes: int, *, urls: list[str], num_stages: int) -> StagePlan | None:
        """On rank 0, with the servers `urls` paused (and in a session where `needs_session`): what
        each pipeline stage's source rank needs to send its own tensors (`sync_from_stages`); None:
        this transport takes the whole model from one sender, rank 0 (`send`)."""
        return None

    def commit_stages(self, urls: list[str], plan: StagePlan, results: list[StageResult]) -> None:
        """On rank 0, once every stage has sent: has the servers load the version, stamped with it.
        The transports whose stages post to the servers themselves only check that every stage sent
        its part, each tensor once (the session's end loads it)."""
        merged_weight_map(plan, results)

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
    buckets = _measured(iter_buckets(named_tensors, bucket_bytes), report)
    update_servers(urls, transport, lambda: transport.send(urls, buckets, version, report))
    report.seconds = time.perf_counter() - start
    return report


def update_servers(urls: list[str], transport: WeightTransport, load: Callable[[], None]) -> None:
    """Runs `load` (the transport's part) with the servers paused, inside a weight-update session
    where the transport needs one, and flushes their caches before they continue."""
    open_update(urls, transport)
    finish_update(urls, transport, load)


def open_update(urls: list[str], transport: WeightTransport) -> None:
    """The first half of `update_servers`: checks the servers, pauses them and opens the session
    (a per-stage sync sends between the two halves, from other ranks)."""
    transport.check_servers(urls)
    post_all(urls, "/pause_generation", protocol.pause_body())
    if not transport.needs_session:
        return
    try:
        post_all(urls, "/begin_weight_update", protocol.begin_update_body())
    except BaseException:
        _end_quietly(urls)  # the servers that did open one
        _continue_quietly(urls)
        raise


def finish_update(urls: list[str], transport: WeightTransport, load: Callable[[], None]) -> None:
    """The second half: `load`, the session closed (even when `load` failed: a server left with an
    open session refuses the next one), caches flushed, generation continued."""
    try:
        try:
            load()
            if transport.needs_session:
                post_all(urls, "/end_weight_update", protocol.end_update_body())
        except BaseException:
            if transport.needs_session:
                _end_quietly(urls)  # a failure to close after a failed update is not raised over it
            raise
        # A prefix cache built by the old weights would serve stale KV to new requests.
        post_all(urls, "/flush_cache", None)
    finally:
        post_all(urls, "/continue_generation", protocol.continue_body())


def _continue_quietly(urls: list[str]) -> None:
    for url in urls:
        try:
            post_all([url], "/continue_generation", protocol.continue_body(), timeout_s=60.0)
        except Exception:  # noqa: BLE001 - the server is gone
            pass


def _end_quietly(urls: list[str]) -> None:
    for url in urls:
        try:
            post_all([url], "/end_weight_update", protocol.end_update_body(), timeout_s=60.0)
        except Exception:  # noqa: BLE001 - no session open there, or the server is gone
            pass


def check_single_dp(urls: list[str], transport: str, ranks_per_server: int) -> None:
    """Each server's /server_info must show dp_size 1 and tp_size `ranks_per_server`.

    SGLang asserts dp_size == 1 in its tensor and distributed weight routes; a tp_size other than
    the ranks we feed means a broadcast group of the wrong size (a hang) or payloads for ranks
    that do not exist.
    """
    from megatron_nft.errors import ConfigError

    for url, info in zip(urls, get_all(urls, "/server_info")):
        if not isinstance(info, dict) or not isinstance(info.get("dp_size"), int) or not isinstance(info.get("tp_size"), int):
            raise protocol.ProtocolError(f"{url}/server_info: expected an object with integer dp_size and tp_size, got {protocol._short(info)}")
        if info["dp_size"] != 1:
            raise ConfigError(
                f"rollout.weight_transport={transport}: {url} runs --dp-size {info['dp_size']}, and SGLang takes "
                f"tensor and broadcast weight updates only from --dp-size 1 servers; use rollout.weight_transport=disk "
                f"(any dp size) or servers with --dp-size 1")
        if info["tp_size"] != ranks_per_server:
            raise ConfigError(
                f"rollout.server_tp_size={ranks_per_server}: {url} runs --tp-size {info['tp_size']}; "
                f"set rollout.server_tp_size={info['tp_size']}")


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
# per pipeline stage: every stage's source rank sends its own tensors, all stages at once
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagePlan:
    """What rank 0 tells every stage's source rank before a per-stage sync (it travels over the
    control group). `target`: where the stages send (the disk transport: the temporary version
    directory, on a file system every stage's source rank and every server sees). `urls`: the
    servers, already paused and in a weight-update session for the transports that post themselves.
    `in_turn`: the stages send one after another (stage order), not all at once. `options`: the
    transport's own settings (the NCCL groups' rendezvous, the tensor payloads' device)."""

    transport: str
    version: int
    bucket_bytes: int
    target: str = ""
    urls: tuple[str, ...] = ()
    in_turn: bool = False
    options: dict = field(default_factory=dict)


@dataclass
class StageResult:
    """One stage source's part of a per-stage sync, gathered on rank 0. `error`: why it failed."""

    stage: int
    weight_map: dict[str, str] = field(default_factory=dict)
    num_tensors: int = 0
    total_bytes: int = 0
    num_buckets: int = 0
    max_bucket_bytes: int = 0
    error: str | None = None


def merged_weight_map(plan: StagePlan, results: list[StageResult]) -> dict[str, str]:
    """The stages' weight maps as one index; a failed stage or a tensor two stages sent raises."""
    failed = [r.error for r in results if r.error is not None]
    if failed:
        raise RuntimeError(f"weight sync v{plan.version}: {'; '.join(failed)}")
    merged: dict[str, str] = {}
    for r in sorted(results, key=lambda r: r.stage):
        twice = sorted(set(merged) & set(r.weight_map))
        if twice:
            raise ValueError(f"weight sync v{plan.version}: stage {r.stage} sent {twice[0]!r}, which another stage sent too")
        merged.update(r.weight_map)
    return merged


def stage_report(plan: StagePlan, results: list[StageResult]) -> SyncReport:
    """The stages' counters as one report (`max_bucket_bytes`: the largest any one sender staged)."""
    return SyncReport(version=plan.version, num_tensors=sum(r.num_tensors for r in results),
                      total_bytes=sum(r.total_bytes for r in results), num_buckets=sum(r.num_buckets for r in results),
                      max_bucket_bytes=max((r.max_bucket_bytes for r in results), default=0))


def write_stage(plan: StagePlan, stage: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> StageResult:
    """A stage source's send for the plan's transport (the transport object itself lives on rank 0)."""
    writers = {DiskTransport.name: DiskTransport.write_stage, NcclBroadcastTransport.name: NcclBroadcastTransport.send_stage,
               CudaIpcTransport.name: CudaIpcTransport.send_stage}
    if plan.transport not in writers:
        raise ValueError(f"weight sync: no per-stage sender for transport {plan.transport!r}")
    return writers[plan.transport](plan, stage, named_tensors)


def sync_from_stages(engine, stage_tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]], *, stage: int,
                     source: bool, version: int, num_stages: int = 1) -> SyncReport | None:
    """Weight sync with every pipeline stage sending its own tensors; every rank calls it.

    Rank 0's `engine` (None on the other ranks) decides: an engine whose transport takes per-stage
    sends (`stage_plan`: SGLang servers) gets them; otherwise (the in-process LocalEngine, which
    only rank 0 can feed) this returns None on every rank and nothing has happened: the caller
    syncs through `hf_tensors()`.

    `stage_tensors()` is the bundle's per-stage stream (every rank calls it: the tensor-parallel
    gathers); `source`: this rank is its stage's sender; `num_stages`: the pipeline's size (the
    NCCL transport's stages send in turn, and every rank takes part in each turn's barrier). The
    ranks then meet on the control group (every stage's part is sent), rank 0 has the servers load
    the whole version, and its outcome is shared, so that a failure anywhere raises on every rank.
    Returns the report on every rank.
    """
    from megatron_nft import runtime

    start = time.perf_counter()
    plan_for = getattr(engine, "stage_plan", None)  # engines without it take one stream on rank 0
    plan, failure = None, None
    if plan_for is not None:
        try:
            plan = plan_for(version, num_stages=num_stages)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
            failure, plan = e, f"{type(e).__name__}: {e}"
    plan = runtime.broadcast_object(plan)
    if failure is not None:
        raise failure
    if isinstance(plan, str):
        raise RuntimeError(f"weight sync v{version} failed on rank 0: {plan}")
    if plan is None:
        return None
    result = None
    for turn in range(num_stages) if plan.in_turn else (stage,):
        if turn == stage:
            result = _send_own_stage(plan, stage, source, stage_tensors)
        if plan.in_turn:
            runtime.barrier()  # stage `turn` has sent everything: the next one starts
    results = [r for r in runtime.gather_objects(result) if r is not None]  # the barrier: all stages sent
    outcome = None
    if engine is not None:
        try:
            report = engine.load_stages(plan, results)
            report.seconds = time.perf_counter() - start
            outcome = report
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
            failure = e
            outcome = f"{type(e).__name__}: {e}"
    outcome = runtime.broadcast_object(outcome)
    if failure is not None:
        raise failure
    if isinstance(outcome, str):
        raise RuntimeError(f"weight sync v{version} failed on rank 0: {outcome}")
    return outcome


def _send_own_stage(plan: StagePlan, stage: int, source: bool, stage_tensors) -> StageResult | None:
    """This rank's part of its stage: the source sends (a failure becomes the result's error), the
    stage's other ranks take part in the stream's collectives."""
    stream = stage_tensors()
    if not source:
        for _ in stream:  # nothing to send here; a lazy stream still owes its collectives
            pass
        return None
    try:
        return write_stage(plan, stage, stream)
    except Exception as e:  # noqa: BLE001 - shared with every rank by the caller, raised everywhere
        for _ in stream:  # the stage's other tensor-parallel ranks wait in the remaining gathers
            pass
        return StageResult(stage, error=f"stage {stage} (rank {_rank()}): {type(e).__name__}: {e}")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


# ----------------------------------------------------------------------------------------------------
# disk
# ----------------------------------------------------------------------------------------------------


class DiskTransport(WeightTransport):
    """Safetensors shards (one per bucket) + an HF index under `root/weights_v<version>`.

    The directory is written under a temporary name and renamed when complete, so a server never
    loads a half-written version; older versions are removed once the servers have loaded the new
    one. `root` must be visible to every server under the same path (a shared file system on a
    cluster), and, for a per-stage sync, to every pipeline stage's source rank.

    Per-stage sync (`stage_plan`, `write_stage`, `commit_stages`): rank 0 makes the temporary
    directory, each stage's source rank writes its own shards there (model-pp<stage>-<n>), all at
    once, and rank 0 writes the index over all of them, renames and has the servers load the
    directory, which is what SGLang's /update_weights_from_disk reads: every shard an index names.
    """

    name = "disk"
    INDEX = "model.safetensors.index.json"

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def version_dir(self, version: int) -> Path:
        return self.root / f"weights_v{version:06d}"

    def _fresh_tmp(self, version: int) -> Path:
        final = self.version_dir(version)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def send(self, urls, buckets, version, report):
        tmp = self._fresh_tmp(version)
        try:
            weight_map, total = _write_shards(tmp, buckets, "model")
            self._publish(urls, tmp, version, weight_map, total)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def stage_plan(self, version, bucket_bytes, *, urls, num_stages):
        return StagePlan(self.name, version, bucket_bytes, str(self._fresh_tmp(version).resolve()), tuple(urls))

    @staticmethod
    def write_stage(plan: StagePlan, stage: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> StageResult:
        """On a stage's source rank: its tensors as shards in the plan's directory (no index)."""
        report = SyncReport(plan.version)
        weight_map, _ = _write_shards(Path(plan.target), _measured(iter_buckets(named_tensors, plan.bucket_bytes), report),
                                      f"model-pp{stage:03d}")
        return StageResult(stage, weight_map, report.num_tensors, report.total_bytes, report.num_buckets,
                           report.max_bucket_bytes)

    def commit_stages(self, urls, plan, results):
        tmp = Path(plan.target)
        try:
            weight_map = merged_weight_map(plan, results)
            self._publish(urls, tmp, plan.version, weight_map, sum(r.total_bytes for r in results))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _publish(self, urls, tmp: Path, version: int, weight_map: dict[str, str], total: int) -> None:
        """Index, rename into place, load on the servers, drop older versions."""
        final = self.version_dir(version)
        index = {"metadata": {"total_size": total, "weight_version": version}, "weight_map": weight_map}
        (tmp / self.INDEX).write_text(json.dumps(index, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        post_all(urls, "/update_weights_from_disk", protocol.update_from_disk_body(str(final.resolve()), version))
        for old in self.root.glob("weights_v*"):
            if old != final and not old.name.startswith(f"{final.name}.tmp"):
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        for old in self.root.glob("weights_v*"):
            shutil.rmtree(old, ignore_errors=True)


def _write_shards(directory: Path, buckets: Iterable[Bucket], prefix: str) -> tuple[dict[str, str], int]:
    """One safetensors file per bucket, `<prefix>-<n>.safetensors`; returns (weight map, bytes)."""
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    total = 0
    # no enumerate(): its cached result tuple would keep the previous bucket alive
    for bucket in buckets:
        fname = f"{prefix}-{len(set(weight_map.values())):05d}.safetensors"
        shard = {name: t.detach().to("cpu").contiguous() for name, t in bucket}
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
        total += sum(tensor_bytes(t) for t in shard.values())
        del shard, bucket
    return weight_map, total


# ----------------------------------------------------------------------------------------------------
# NCCL broadcast
# ----------------------------------------------------------------------------------------------------


GROUP_TIMEOUT = timedelta(minutes=10)


def init_weight_update_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str, backend: str,
                             *, store=None):
    """Joins (as `rank`) the process group the servers build in /init_weights_update_group.

    The server side (sglang.srt.utils.init_custom_process_group) rendezvouses over
    tcp://master_address:master_port, prefixes the store with the group name and builds the group
    with torch's process-group helper, outside any default group. The store keys only meet if we
    build ours the same way, so this follows the same steps; group rank 0 hosts the store, unless
    `store` is given (a stage's sender connects to the store global rank 0 hosts for its group).
    """
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    timeout = GROUP_TIMEOUT
    if store is None:
        store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout))
        store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name, timeout=timeout)
    # what new_group records too: destroy_process_group looks the group's ranks up here
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


class NcclBroadcastTransport(WeightTransport):
    """Broadcasts each bucket from trainer rank 0 to every server rank of a dedicated group.

    `ranks_per_server` is each server's tensor-parallel size (every server rank receives the full
    tensors and keeps its shard). `backend="gloo"` runs the same protocol on CPU.
    """

    name = "nccl"
    needs_session = True

    def __init__(self, master_address: str, master_port: int, *, ranks_per_server: int = 1,
                 group_name: str = "megatron_nft_weight_sync", backend: str = "nccl", device: str | None = None):
        self.master_address, self.master_port = master_address, int(master_port)
        self.ranks_per_server, self.group_name, self.backend = int(ranks_per_server), group_name, backend
        self.device = torch.device(device or ("cuda" if backend == "nccl" else "cpu"))
        self._group = None
        self._urls: list[str] | None = None
        self._stores: list = []  # per-stage sync: one rendezvous store per stage's group, hosted here
        self._stage_names: list[str] = []
        self._stage_urls: list[str] = []

    def init_bodies(self, urls: list[str]) -> list[dict]:
        """One /init_weights_update_group body per server: trainer rank 0, then each server's ranks."""
        return _init_bodies(urls, self.master_address, self.master_port, self.ranks_per_server, self.group_name, self.backend)

    def stage_group_name(self, stage: int) -> str:
        return f"{self.group_name}_pp{stage:03d}"

    def stage_plan(self, version, bucket_bytes, *, urls, num_stages):
        """One group per stage, each stage's sender its rank 0; the rendezvous stores live here, on
        global rank 0, whose address (`master_address`) the servers reach already: stage 0's at
        `master_port`, the others' on ports the system picks. The stages send in turn (module
        docstring: concurrent broadcasts over several groups can deadlock the servers)."""
        from torch.distributed import TCPStore

        while len(self._stores) < num_stages:
            port = self.master_port if not self._stores else 0
            # multi_tenant: the one-stream path's rendezvous (send) may host master_port in this process too
            self._stores.append(TCPStore(self.master_address, port, None, True, timeout=GROUP_TIMEOUT,
                                         wait_for_workers=False, multi_tenant=True))
        names = [self.stage_group_name(s) for s in range(num_stages)]
        self._stage_names = sorted(set(self._stage_names) | set(names))
        self._stage_urls = list(urls)
        options = {"master_address": self.master_address, "ports": [st.port for st in self._stores[:num_stages]],
                   "group_names": names, "backend": self.backend, "ranks_per_server": self.ranks_per_server}
        return StagePlan(self.name, version, bucket_bytes, urls=tuple(urls), in_turn=True, options=options)

    @staticmethod
    def send_stage(plan: StagePlan, stage: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> StageResult:
        """On a stage's source rank: its tensors broadcast over its own group, bucket by bucket,
        from the device they are on (NCCL: the GPU; no host copy)."""
        group, name = _stage_group(plan, stage)
        report = SyncReport(plan.version)
        weight_map: dict[str, str] = {}
        to_send = functools.partial(_sendable, plan.options["backend"])
        for bucket in _measured(iter_buckets(named_tensors, plan.bucket_bytes), report):
            try:
                _broadcast_bucket(group, list(plan.urls), bucket, name, plan.version, to_send)
            except BaseException:
                # a broadcast left half-fed, or a bucket refused: the group cannot be trusted again
                leave_stage_group(plan.options["group_names"][stage])
                raise
            weight_map.update((n, name) for n, _ in bucket)
            del bucket
        return StageResult(stage, weight_map, report.num_tensors, report.total_bytes, report.num_buckets,
                           report.max_bucket_bytes)

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
        self._group = _join_as_sender(urls, self.init_bodies(urls))
        self._urls = list(urls)

    def send(self, urls, buckets, version, report):
        self._connect(urls)
        to_device = lambda t: t.detach().to(self.device).contiguous()  # noqa: E731
        for bucket in buckets:
            try:
                _broadcast_bucket(self._group, urls, bucket, self.group_name, version, to_device)
            except BaseException:
                self.close()  # a broadcast left half-fed: the group cannot be trusted again
                raise
            del bucket  # before the next bucket is built

    def commit_stages(self, urls, plan, results):
        # the names the stages' groups carry now (a rejoined group has a new one): close() leaves them
        self._stage_names = sorted(set(self._stage_names) | {g for r in results for g in r.weight_map.values()})
        super().commit_stages(urls, plan, results)

    def close(self) -> None:
        """Leaves the groups on both sides, so that the group names can be used again: the one-stream
        group, this rank's own stage group, and the other stages' groups on the servers' side (their
        senders' side ends with their processes)."""
        group, urls, self._group, self._urls = self._group, self._urls, None, None
        if group is not None:
            _leave(group, urls, self.group_name)
        for name in self._stage_names:
            if name in _STAGE_GROUPS:
                leave_stage_group(name)
            elif not any(held[3] == name for held in _STAGE_GROUPS.values()):
                _leave(None, self._stage_urls, name)  # another rank's group: the servers' side only
        self._stage_names, self._stage_urls, self._stores = [], [], []


def _init_bodies(urls, master_address, master_port, ranks_per_server, group_name, backend) -> list[dict]:
    world = 1 + ranks_per_server * len(urls)
    return [protocol.init_group_body(master_address, master_port, 1 + i * ranks_per_server, world, group_name, backend)
            for i in range(len(urls))]


def _join_as_sender(urls: list[str], bodies: list[dict], store=None):
    """Group rank 0's side of /init_weights_update_group on every server."""
    first = bodies[0]
    # The servers block in /init_weights_update_group until rank 0 joins: post from threads.
    posts = [_post_in_thread(u, "/init_weights_update_group", b) for u, b in zip(urls, bodies)]
    group = init_weight_update_group(first["master_address"], first["master_port"], 0, first["world_size"],
                                     first["group_name"], first["backend"], store=store)
    for post in posts:
        post.result()
    return group


def _leave(group, urls: list[str], group_name: str) -> None:
    import torch.distributed as dist

    for url in urls:
        try:
            post_all([url], "/destroy_weights_update_group", protocol.destroy_group_body(group_name), timeout_s=60.0)
        except Exception:  # noqa: BLE001 - a server that is gone has left the group too
            pass
    if group is not None:
        dist.destroy_process_group(group)


# On each stage's sender, by the plan's group name: (the group it built, the servers it was built
# for, its store, the name it joined under). A group lives across syncs (joining costs a rendezvous
# with every server); it is rebuilt when the servers change and left after a failed bucket. A rebuilt
# group takes a new name (`<name>.<n>`): the rendezvous keys of the old one stay in the store (torch
# names them after the group), and a new group under the old name could read them.
_STAGE_GROUPS: dict[str, tuple] = {}
_JOINS: dict[str, int] = {}


def _stage_group(plan: StagePlan, stage: int):
    """(group, name) of this rank's stage group for `plan`, joined now if it has none for these servers."""
    from torch.distributed import TCPStore

    options, urls = plan.options, tuple(plan.urls)
    base = options["group_names"][stage]
    held = _STAGE_GROUPS.get(base)
    if held is not None and held[1] == urls:
        return held[0], held[3]
    if held is not None:
        leave_stage_group(base)
    joins = _JOINS[base] = _JOINS.get(base, -1) + 1
    name = base if joins == 0 else f"{base}.{joins}"
    port = options["ports"][stage]
    bodies = _init_bodies(list(urls), options["master_address"], port, options["ranks_per_server"], name, options["backend"])
    store = TCPStore(options["master_address"], port, None, False, timeout=GROUP_TIMEOUT)
    group = _join_as_sender(list(urls), bodies, store=store)
    _STAGE_GROUPS[base] = (group, urls, store, name)
    return group, name


def leave_stage_group(base: str) -> None:
    """This rank leaves its stage group of plan name `base` (and has the servers leave it); a no-op
    without one."""
    held = _STAGE_GROUPS.pop(base, None)
    if held is not None:
        _leave(held[0], list(held[1]), held[3])


def _sendable(backend: str, tensor: torch.Tensor) -> torch.Tensor:
    """NCCL broadcasts GPU memory only: a host tensor here is an upstream mistake (the stage stream
    yields tensors on the model's device), refused rather than copied to the GPU behind its back."""
    if backend == "nccl" and tensor.device.type != "cuda":
        raise ValueError(f"nccl weight transport: got a tensor on {tensor.device}; NCCL sends GPU tensors only")
    return tensor.detach().contiguous()


def _broadcast_bucket(group, urls: list[str], bucket: Bucket, group_name: str, version: int, to_device) -> None:
    """One /update_weights_from_distributed per server (each then waits in broadcast) while this
    rank, group rank 0, feeds the bucket's tensors in order."""
    tensors = [to_device(t) for _, t in bucket]  # before any server waits for them
    body = NcclBroadcastTransport.bucket_body(bucket, group_name, version)
    posts = [_post_in_thread(u, "/update_weights_from_distributed", body) for u in urls]
    works = [group.broadcast(t, 0) for t in tensors]
    _wait_broadcast(works, posts)
    for post in posts:
        post.result()


def _wait_broadcast(works, posts, poll_s: float = 0.01) -> None:
    """Waits for the broadcasts, but raises as soon as a server has answered with an error: a
    server that refuses the bucket (no session, a bad shape) never joins, and the broadcast would
    otherwise wait for it until the group's timeout."""
    while not all(w.is_completed() for w in works):
        for post in posts:
            if post.done() and post.error is not None:
                raise post.error
        time.sleep(poll_s)
    for w in works:
        w.wait()


class _PostThread:
    def __init__(self, url, path, body):
        self.error = None
        self._thread = threading.Thread(target=self._run, args=(url, path, body), daemon=True)
        self._thread.start()

    def _run(self, url, path, body):
        try:
            post_all([url], path, body)
        except BaseException as e:  # noqa: BLE001 - re-raised in result()
            self.error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self):
        self._thread.join()
        if self.error is not None:
            raise self.error


def _post_in_thread(url: str, path: str, body: dict) -> _PostThread:
    return _PostThread(url, path, body)


# ----------------------------------------------------------------------------------------------------
# CUDA IPC
# ----------------------------------------------------------------------------------------------------


def serialize_named_tensors(bucket: Bucket, *, reduce_tensor=None, device_uuid=None) -> str:
    """One receiving rank's payload in SGLang's MultiprocessingSerializer format: a ForkingPickler
    dump of [(name, tensor)], base64.

    CUDA tensors travel as CUDA IPC handles (torch's reduce_tensor), with the device named by its
    UUID where torch writes the sender's device index: SGLang rebuilds them through its patched
    rebuild_cuda_tensor (sglang.srt.utils.patch_torch), which maps a UUID to the receiver's own
    index of that GPU, and takes an index as its own. CPU tensors travel as named shared-memory
    files (torch's file_system strategy): the default fd strategy hands descriptors over
    multiprocessing's resource sharer, which only the sender's own children can reach.

    Every serialization takes its own share of the memory (one reference for the receiver to
    release), so every receiving rank needs its own payload. `reduce_tensor` and `device_uuid`
    replace torch's reducer and CUDA's UUID lookup (tests).
    """
    from multiprocessing.reduction import ForkingPickler

    from torch.multiprocessing import reductions

    reduce = reduce_tensor or reductions.reduce_tensor
    uuid_of = device_uuid or _cuda_device_uuid

    def reduce_with_uuid(tensor):
        rebuild, args = reduce(tensor)
        if rebuild is reductions.rebuild_cuda_tensor:
            args = (*args[:_CUDA_DEVICE_ARG], uuid_of(args[_CUDA_DEVICE_ARG]), *args[_CUDA_DEVICE_ARG + 1 :])
        return rebuild, args

    buffer = io.BytesIO()
    pickler = ForkingPickler(buffer)
    # This pickler's own table (ForkingPickler copies copyreg's per instance): nothing global changes.
    pickler.dispatch_table = dict(pickler.dispatch_table)
    for cls in (torch.Tensor, torch.nn.Parameter, *torch._tensor_classes):
        pickler.dispatch_table[cls] = reduce_with_uuid
    pickler.dispatch_table[torch.UntypedStorage] = _reduce_storage_by_name
    pickler.dump([(name, t.detach()) for name, t in bucket])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# Position of the device in torch.multiprocessing.reductions.rebuild_cuda_tensor's arguments: the
# index SGLang's patch_torch rewrites (_REDUCE_TENSOR_ARG_DEVICE_INDEX there).
_CUDA_DEVICE_ARG = 6


def _cuda_device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _reduce_storage_by_name(storage):
    """torch's file_system sharing for one CPU storage, whatever the process-wide strategy is."""
    from torch.multiprocessing import reductions

    if storage.device.type != "cpu":
        return reductions.reduce_storage(storage)
    if storage.size() == 0:
        return reductions.rebuild_storage_empty, (type(storage),)
    manager, handle, size = storage._share_filename_cpu_()
    storage._shared_incref()  # the receiver's rebuild releases it (rebuild_storage_filename)
    return reductions.rebuild_storage_filename, (type(storage), manager, handle, size)


class CudaIpcTransport(WeightTransport):
    """/update_weights_from_tensor with CUDA IPC handles: servers on the trainer's node.

    Each bucket is copied to `device` (a no-op for tensors already there) and kept alive until every
    server has answered (the handles point at that memory). Each server gets `ranks_per_server`
    payloads, one per tensor-parallel rank, each serialized on its own (SGLang's rank r
    deserializes entry r only). `device="cpu"` sends CPU shared memory the same way.
    """

    name = "cuda_ipc"
    needs_session = True

    def __init__(self, *, ranks_per_server: int = 1, device: str = "cuda", reduce_tensor=None, device_uuid=None):
        self.ranks_per_server, self.device = int(ranks_per_server), torch.device(device)
        self._serialize = functools.partial(serialize_named_tensors, reduce_tensor=reduce_tensor, device_uuid=device_uuid)

    def bucket_body(self, bucket: Bucket, version: int) -> dict:
        """One server's body: a payload per tensor-parallel rank."""
        return protocol.update_from_tensor_body([self._serialize(bucket) for _ in range(self.ranks_per_server)], version)

    def send(self, urls, buckets, version, report):
        for bucket in buckets:
            # CPU: a copy of our own, because sharing moves a storage into shared memory in place
            staged = [(n, t.detach().to(self.device, copy=self.device.type == "cpu").contiguous()) for n, t in bucket]
            del bucket
            post_each(urls, "/update_weights_from_tensor", [self.bucket_body(staged, version) for _ in urls])
            del staged

    def stage_plan(self, version, bucket_bytes, *, urls, num_stages):
        """Every stage posts its own buckets to the servers (paused, in the session rank 0 opened),
        all stages at once: a server takes one tensor request at a time, and none waits for another."""
        return StagePlan(self.name, version, bucket_bytes, urls=tuple(urls),
                         options={"ranks_per_server": self.ranks_per_server, "device": str(self.device)})

    @staticmethod
    def send_stage(plan: StagePlan, stage: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> StageResult:
        """On a stage's source rank: its own tensors as payloads of its own device (a GPU's handles
        name that GPU by UUID), bucket by bucket, each kept alive until every server has copied it."""
        sender = CudaIpcTransport(ranks_per_server=plan.options["ranks_per_server"], device=plan.options["device"])
        report = SyncReport(plan.version)
        weight_map: dict[str, str] = {}

        def noted(buckets):
            for bucket in buckets:
                weight_map.update((n, f"pp{stage:03d}") for n, _ in bucket)
                yield bucket
                del bucket

        sender.send(list(plan.urls), noted(_measured(iter_buckets(named_tensors, plan.bucket_bytes), report)), plan.version, report)
        return StageResult(stage, weight_map, report.num_tensors, report.total_bytes, report.num_buckets,
                           report.max_bucket_bytes)
