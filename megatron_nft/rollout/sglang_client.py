"""The rollout engine backed by SGLang servers over HTTP (or local HTTP servers, same API).

    engine = SGLangEngine(["http://node1:30000", "http://node2:30000"], transport=DiskTransport(shared))
    engine.update_weights(actor.hf_tensors(), version=0)
    completions = engine.generate(prompt_ids, SamplingParams(n=16, max_new_tokens=3584))

Generation: one /generate request per prompt (its n samples come back together), spread over the
servers with at most `max_concurrency` requests in flight on each: a worker pool per server pulls
prompts from one shared queue, so faster servers take more. Failures:
  - connection errors, HTTP 5xx, a request past its deadline or an aborted request are retried on
    the same server with exponential back-off, up to `max_retries` times;
  - then the server is dropped and the prompt goes back to the queue for the others. A prompt's
    result is recorded once, when its first complete answer arrives, so a re-sent prompt is never
    counted twice; with every server dropped, generate raises.
  - a dropped server whose /health answers again (restarted in place) rejoins at the next weight
    sync, which gives it the current weights first (never mid-rollout: it would serve stale ones);
    a live server that no longer answers /health at a weight sync (it died between rollouts) is
    dropped there instead of failing the sync. Neither with the NCCL transport, whose process group
    was built for a fixed set of servers.
  - HTTP 4xx (a request the server will never accept) and malformed answers raise at once.

Every Completion carries the weight version the server reported for it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

from megatron_nft.rollout import protocol
from megatron_nft.rollout.base import Completion, RolloutEngine, SamplingParams
from megatron_nft.rollout.control import request_json, wait_healthy
from megatron_nft.rollout.weight_sync import (
    DEFAULT_BUCKET_BYTES, SyncReport, WeightTransport, finish_update, open_update, stage_report, sync_weights,
    update_servers,
)


class RequestRejected(RuntimeError):
    """A server refused a request with HTTP 4xx: retrying elsewhere would not help."""


class _Retriable(Exception):
    """An attempt failed in a way another attempt may not (connection, 5xx, deadline, abort)."""


@dataclass
class ServerStats:
    """Per-server counters of the last generate call (and whether the server is still used)."""

    url: str
    alive: bool = True
    requests_ok: int = 0
    attempts_failed: int = 0
    last_error: str = ""


@dataclass
class GenerateStats:
    servers: list[ServerStats] = field(default_factory=list)
    resent: int = 0  # prompts put back in the queue after their server was dropped
    seconds: float = 0.0


class SGLangEngine(RolloutEngine):
    """RolloutEngine over SGLang-compatible HTTP servers; see the module docstring.

    urls: base URLs ("http://host:port"). servers: ServerProcess objects this engine launched and
    owns (stopped by close()). transport: how update_weights reaches the servers (required for it).
    """

    def __init__(
        self,
        urls: list[str],
        *,
        transport: WeightTransport | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        max_concurrency: int = 64,
        request_timeout_s: float = 3600.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        progress: bool = False,
        servers: list = (),
    ):
        if not urls:
            raise ValueError("SGLangEngine: no server URLs")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"SGLangEngine.max_concurrency must be an integer >= 1, got {max_concurrency!r}")
        if not request_timeout_s > 0:
            raise ValueError(f"SGLangEngine.request_timeout_s must be > 0, got {request_timeout_s!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"SGLangEngine.max_retries must be an integer >= 0, got {max_retries!r}")
        self.urls = [u.rstrip("/") for u in urls]
        self.transport, self.bucket_bytes = transport, bucket_bytes
        self.max_concurrency, self.request_timeout_s = max_concurrency, request_timeout_s
        self.max_retries, self.backoff_s, self.progress = max_retries, backoff_s, progress
        self._servers = list(servers)
        self._alive = {u: True for u in self.urls}
        self._version = -1
        self.last_stats = GenerateStats()
        self.last_sync: SyncReport | None = None
        self.rejoined: list[str] = []  # servers taken back at the last weight sync
        self._back: list[str] = []  # servers a per-stage sync under way takes back (stage_plan)
        self._request_seconds: list[float] = []  # per answered request, since take_request_seconds

    # ------------------------------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def servers(self) -> list:
        """The ServerProcess objects this engine launched (empty when it attached to URLs)."""
        return list(self._servers)

    @property
    def live_urls(self) -> list[str]:
        return [u for u in self.urls if self._alive[u]]

    def take_request_seconds(self) -> list[float]:
        """Seconds from first attempt to answer of every request answered since the last call (retries
        included): the trainer's straggler figure, per step over all its generation rounds."""
        seconds, self._request_seconds = self._request_seconds, []
        return seconds

    def wait_ready(self, timeout_s: float = 1800.0) -> None:
        """Blocks until every server answers /health_generate (a launched one that exits raises)."""
        by_url = {s.url.rstrip("/"): s for s in self._servers}

        def alive(url):
            if url in by_url:
                by_url[url].check_alive()

        wait_healthy(self.live_urls, timeout_s=timeout_s, alive=alive)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if self.transport is None:
            raise RuntimeError("SGLangEngine.update_weights: no weight transport configured")
        back = self._regroup() if self.transport.name != "nccl" else []
        self.last_sync = sync_weights(self.live_urls + back, named_tensors, version, self.transport,
                                      bucket_bytes=self.bucket_bytes)
        for url in back:  # they hold the current weights now
            self._alive[url] = True
        self.rejoined = back
        self._version = version

    def stage_plan(self, version: int, num_stages: int = 1):
        """The plan of a sync in which every pipeline stage sends its own tensors
        (weight_sync.sync_from_stages), or None when the transport takes one stream from rank 0.
        The servers it names (with those that rejoin) are fixed here; a transport whose stages post
        to them directly finds them paused and in a weight-update session when this returns."""
        if self.transport is None:
            raise RuntimeError("SGLangEngine.stage_plan: no weight transport configured")
        self._back = self._regroup() if self.transport.name != "nccl" else []
        urls = self.live_urls + self._back
        if self.transport.needs_session:
            open_update(urls, self.transport)
        try:
            return self.transport.stage_plan(version, self.bucket_bytes, urls=urls, num_stages=num_stages)
        except BaseException:
            if self.transport.needs_session:
                finish_update(urls, self.transport, lambda: None)
            raise

    def load_stages(self, plan, results) -> SyncReport:
        """After every stage has sent its part of `plan`: the servers load the version (paused
        meanwhile, as in update_weights) and continue."""
        urls, back = list(plan.urls), self._back
        commit = lambda: self.transport.commit_stages(urls, plan, results)  # noqa: E731
        if self.transport.needs_session:
            finish_update(urls, self.transport, commit)  # opened by stage_plan
        else:
            update_servers(urls, self.transport, commit)
        self.last_sync = stage_report(plan, results)
        for url in back:
            self._alive[url] = True
        self.rejoined = back
        self._version = plan.version
        return self.last_sync

    def _regroup(self) -> list[str]:
        """Before a weight sync: drops the live servers that no longer answer /health (one that died,
        or was given up, since the last rollout would fail the whole sync) and returns the dropped
        ones that answer again (restarted in place), which this sync takes back."""
        healthy = _answer_health(self.urls)
        for url in self.live_urls:
            if not healthy[url]:
                self._alive[url] = False
        if not self.live_urls and not any(healthy.values()):
            raise RuntimeError("SGLangEngine: no rollout server answers /health; every one has been dropped")
        return [u for u in self.urls if not self._alive[u] and healthy[u]]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        for server in self._servers:
            server.stop()
        self._servers = []

    # ------------------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"generate: params must be a SamplingParams, got {type(params).__name__}")
        if not prompts:
            return []
        start = time.perf_counter()
        results = asyncio.run(self._generate(prompts, params))
        self.last_stats.seconds = time.perf_counter() - start
        return [
            Completion(prompt_index=i, token_ids=s.token_ids, logprobs=s.logprobs, finish_reason=s.finish_reason,
                       weight_version=s.weight_version)
            for i, samples in enumerate(results)
            for s in samples
        ]

    async def _generate(self, prompts, params) -> list[list[protocol.Sample]]:
        import aiohttp
        from tqdm import tqdm

        live = self.live_urls
        if not live:
            raise RuntimeError("SGLangEngine.generate: every rollout server has been dropped")
        stats = GenerateStats(servers=[ServerStats(u) for u in live])
        self.last_stats = stats
        results: list[list[protocol.Sample] | None] = [None] * len(prompts)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(prompts)):
            queue.put_nowait(i)
        remaining = [len(prompts)]
        finished = asyncio.Event()
        bar = tqdm(total=len(prompts) * params.n, desc="rollout", unit="sample", disable=not self.progress, leave=False)
        connector = aiohttp.TCPConnector(limit=0)  # our own per-server bound applies

        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker(server: ServerStats, server_down: asyncio.Event):
                while not server_down.is_set():
                    index = await queue.get()
                    if server_down.is_set():  # another worker found the server dead meanwhile
                        queue.put_nowait(index)
                        return
                    try:
                        samples = await self._request_with_retries(session, server, prompts[index], params)
                    except _Retriable:
                        # this server is gone: drop it, hand the prompt to the others
                        server.alive = False
                        self._alive[server.url] = False
                        server_down.set()
                        stats.resent += 1
                        queue.put_nowait(index)
                        if not any(s.alive for s in stats.servers):
                            finished.set()
                        return
                    if results[index] is None:
                        results[index] = samples
                        remaining[0] -= 1
                        bar.update(params.n)
                        if remaining[0] == 0:
                            finished.set()

            tasks = []
            for server in stats.servers:
                down = asyncio.Event()
                tasks += [asyncio.create_task(worker(server, down)) for _ in range(self.max_concurrency)]
            waiter = asyncio.create_task(finished.wait())
            try:
                # Also wake up when a worker raised (a 4xx or a protocol error): that ends the call.
                while not waiter.done():
                    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
                    for t in tasks:
                        if t.done() and not t.cancelled() and t.exception() is not None:
                            raise t.exception()
                    tasks = [t for t in tasks if not t.done()]
                    if not tasks and not waiter.done():
                        break
            finally:
                waiter.cancel()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                bar.close()
        if remaining[0]:
            errors = "; ".join(f"{s.url}: {s.last_error}" for s in stats.servers)
            raise RuntimeError(f"SGLangEngine.generate: every rollout server failed ({errors}); {remaining[0]} prompts unanswered")
        return results

    async def _request_with_retries(self, session, server: ServerStats, prompt, params) -> list[protocol.Sample]:
        body = protocol.generate_body([prompt], params)
        started = time.perf_counter()
        for attempt in range(self.max_retries + 1):
            try:
                samples = await self._request_once(session, server.url, body, params.n)
                server.requests_ok += 1
                self._request_seconds.append(time.perf_counter() - started)
                return samples
            except _Retriable as e:
                server.attempts_failed += 1
                server.last_error = str(e)
                if attempt == self.max_retries:
                    raise
                await asyncio.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    async def _request_once(self, session, url: str, body: dict, n: int) -> list[protocol.Sample]:
        import aiohttp

        try:
            status, payload = await request_json(session, "POST", url + "/generate", body, timeout_s=self.request_timeout_s)
        except asyncio.TimeoutError:
            raise _Retriable(f"no answer within {self.request_timeout_s}s") from None
        except (aiohttp.ClientError, OSError) as e:
            raise _Retriable(f"{type(e).__name__}: {e}") from None
        if status >= 500:
            raise _Retriable(f"HTTP {status}: {str(payload)[:300]}")
        if status != 200:
            raise RequestRejected(f"{url}/generate: HTTP {status}: {str(payload)[:500]}")
        try:
            return protocol.parse_generate_response(payload, 1, n)[0]
        except protocol.AbortedError as e:
            raise _Retriable(str(e)) from None


def _answer_health(urls: list[str], timeout_s: float = 5.0) -> dict[str, bool]:
    """Whether each server answers GET /health with 200, all asked at once."""
    import aiohttp

    async def probe(session, url):
        try:
            status, _ = await request_json(session, "GET", url + "/health", timeout_s=timeout_s)
            return status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def probe_all():
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(probe(session, u) for u in urls))

    return dict(zip(urls, asyncio.run(probe_all())))
