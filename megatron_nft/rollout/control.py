"""Control-plane HTTP calls to rollout servers: health checks, pause/continue, cache flushes and
weight updates, sent to every server at once and waited for.

aiohttp (the `rollout` extra) rather than the standard library: the generation path needs its
connection pooling and asyncio concurrency, and one HTTP stack is easier to reason about than two.
These calls are few and synchronous from the caller's side: each runs its own short event loop.
"""

from __future__ import annotations

import asyncio
import json
import time


class ServerError(RuntimeError):
    """A server refused a control call (non-2xx status or `success: false`)."""


async def request_json(session, method: str, url: str, body: dict | None = None, *, timeout_s: float | None = None):
    """One HTTP call; returns (status, parsed JSON or text)."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with session.request(method, url, json=body, timeout=timeout) as resp:
        text = await resp.text()
        try:
            payload = json.loads(text) if text else None
        except json.JSONDecodeError:
            payload = text
        return resp.status, payload


def post_all(urls: list[str], path: str, body: dict | None, *, timeout_s: float = 600.0) -> list:
    """POSTs `body` to `path` on every server concurrently; raises ServerError naming the first
    server that refused. Returns the parsed responses in `urls` order."""
    return asyncio.run(_request_all("POST", urls, path, [body] * len(urls), timeout_s))


def post_each(urls: list[str], path: str, bodies: list[dict], *, timeout_s: float = 600.0) -> list:
    """post_all with one body per server (`bodies[i]` goes to `urls[i]`)."""
    if len(bodies) != len(urls):
        raise ValueError(f"post_each: {len(bodies)} bodies for {len(urls)} servers")
    return asyncio.run(_request_all("POST", urls, path, bodies, timeout_s))


def get_all(urls: list[str], path: str, *, timeout_s: float = 60.0) -> list:
    """GETs `path` from every server concurrently; raises ServerError on a non-2xx answer."""
    return asyncio.run(_request_all("GET", urls, path, [None] * len(urls), timeout_s))


async def _request_all(method, urls, path, bodies, timeout_s):
    import aiohttp

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(request_json(session, method, u + path, b, timeout_s=timeout_s) for u, b in zip(urls, bodies)))
    for url, (status, payload) in zip(urls, results):
        refused = isinstance(payload, dict) and payload.get("success") is False
        if not 200 <= status < 300 or refused:
            message = payload.get("message", payload) if isinstance(payload, dict) else payload
            raise ServerError(f"{url}{path}: HTTP {status}: {str(message).strip()[:500]}")
    return [payload for _, payload in results]


def wait_healthy(urls: list[str], *, timeout_s: float, poll_s: float = 1.0, alive=None) -> None:
    """Waits until GET /health_generate answers 200 on every server (SGLang answers 503 while
    starting). `alive(url)`, when given, is asked between polls and may raise (a launched server
    that exited)."""
    asyncio.run(_wait_healthy(urls, timeout_s, poll_s, alive))


async def _wait_healthy(urls, timeout_s, poll_s, alive):
    import aiohttp

    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    last: dict[str, str] = {}
    async with aiohttp.ClientSession() as session:
        while pending:
            for url in list(pending):
                try:
                    status, _ = await request_json(session, "GET", url + "/health_generate", timeout_s=max(poll_s, 5.0))
                    if status == 200:
                        pending.remove(url)
                        continue
                    last[url] = f"HTTP {status}"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                    last[url] = type(e).__name__
                if alive is not None:
                    alive(url)
            if not pending:
                break
            if time.monotonic() > deadline:
                states = ", ".join(f"{u} ({last.get(u, 'no answer')})" for u in pending)
                raise TimeoutError(f"rollout servers not healthy after {timeout_s:.0f}s: {states}")
            await asyncio.sleep(poll_s)
