"""The local CPU engine served over SGLang's native HTTP API (the subset the trainer uses).

    python -m megatron_nft.rollout.http_server --model-path DIR --port 30000 [--load-format dummy]

A real aiohttp server running the real model (LocalEngine: transformers Qwen2 on CPU), so the
SGLang client, the failover logic and the disk weight sync run end to end on machines without a
GPU. Routes, with SGLang's request and response bodies (see protocol.py):

  POST /generate                   input_ids (one prompt or a batch), sampling_params (temperature,
                                   top_p, max_new_tokens, stop_token_ids, n, sampling_seed),
                                   return_logprob
  GET  /health, /health_generate   200 once the model is loaded
  GET  /get_model_info, /model_info
  GET|POST /flush_cache            no prefix cache here: nothing to flush, answers 200
  POST /pause_generation           no new batch starts until /continue_generation (a running batch
  POST /continue_generation        finishes under the weights it started with)
  POST /update_weights_from_disk   model_path (safetensors + optional index), weight_version

Concurrent /generate requests with the same sampling parameters are batched into one
LocalEngine.generate call (what SGLang's scheduler does continuously); generation and weight loads
run on one worker thread, so a weight update never lands in the middle of a batch. With
`sampling_seed`, a request's samples depend on what it was batched with.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from megatron_nft.rollout import protocol
from megatron_nft.rollout.base import FINISH_STOP, Completion, SamplingParams

# sampling_params keys this server honours; any other key is refused (SGLang would apply it).
SAMPLING_KEYS = {"temperature", "top_p", "max_new_tokens", "stop_token_ids", "n", "sampling_seed"}
# /generate fields that change nothing here (their values are accepted as SGLang's defaults).
IGNORED_GENERATE_KEYS = {"rid", "return_logprob", "logprob_start_len", "return_text_in_logprobs", "stream"}


class BadRequest(ValueError):
    """The request body is not one this server can serve; the message names the field."""


@dataclass
class _Job:
    prompts: list[list[int]]
    params: SamplingParams
    future: asyncio.Future
    received: float = field(default_factory=time.perf_counter)


def parse_sampling_params(raw) -> SamplingParams:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadRequest(f"sampling_params: expected an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - SAMPLING_KEYS)
    if unknown:
        raise BadRequest(f"sampling_params.{unknown[0]}: not supported by the local engine (supported: {', '.join(sorted(SAMPLING_KEYS))})")
    kwargs = {k: raw[k] for k in ("temperature", "top_p", "max_new_tokens", "n") if raw.get(k) is not None}
    if raw.get("stop_token_ids") is not None:
        kwargs["stop_token_ids"] = raw["stop_token_ids"]
    if raw.get("sampling_seed") is not None:
        kwargs["seed"] = raw["sampling_seed"]
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise BadRequest(f"sampling_params: {e}") from None


def parse_generate_body(body) -> tuple[list[list[int]], SamplingParams, bool]:
    """(prompts, params, single): a batch must share one set of sampling parameters here."""
    if not isinstance(body, dict):
        raise BadRequest("/generate: expected a JSON object")
    if body.get("stream"):
        raise BadRequest("stream: streaming is not supported by the local engine")
    unknown = sorted(k for k in body if k not in IGNORED_GENERATE_KEYS | {"input_ids", "sampling_params"} and body[k] not in (None, False))
    if unknown:
        raise BadRequest(f"{unknown[0]}: not supported by the local engine (it takes input_ids, sampling_params, return_logprob)")
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise BadRequest("input_ids: expected a non-empty list of token ids or a list of such lists")
    single = not isinstance(ids[0], list)
    prompts = [ids] if single else ids
    for i, p in enumerate(prompts):
        if not isinstance(p, list) or not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise BadRequest(f"input_ids[{i}]: expected a non-empty list of integer token ids")
    raw = body.get("sampling_params")
    if isinstance(raw, list):
        if len(raw) != len(prompts):
            raise BadRequest(f"sampling_params: {len(raw)} entries for {len(prompts)} prompts")
        if any(r != raw[0] for r in raw):
            raise BadRequest("sampling_params: per-prompt parameters must be equal for the local engine")
        raw = raw[0] if raw else None
    return prompts, parse_sampling_params(raw), single


def response_item(c: Completion, prompt_len: int, params: SamplingParams, latency: float) -> dict:
    """One /generate item in SGLang's shape (see protocol.py)."""
    if c.finish_reason == FINISH_STOP:
        finish = {"type": "stop", "matched": c.token_ids[-1]}
    else:
        finish = {"type": "length", "length": params.max_new_tokens}
    version = protocol.DEFAULT_WEIGHT_VERSION if c.weight_version < 0 else str(c.weight_version)
    return {
        "text": "",  # no tokenizer here: token ids only (SGLang's skip_tokenizer_init answers the same)
        "output_ids": list(c.token_ids),
        "meta_info": {
            "id": uuid.uuid4().hex,
            "finish_reason": finish,
            "prompt_tokens": prompt_len,
            "completion_tokens": len(c.token_ids),
            "cached_tokens": 0,
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(c.logprobs, c.token_ids)],
            "weight_version": version,
            "e2e_latency": latency,
        },
    }


class LocalServer:
    """The application state: one LocalEngine, a queue of /generate jobs and a pause switch."""

    def __init__(self, engine, model_path: str):
        self.engine, self.model_path = engine, model_path
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-engine")
        self.jobs: list[_Job] = []
        self.wakeup = asyncio.Event()
        self.running = asyncio.Event()  # cleared while paused
        self.running.set()

    # -- generation ---------------------------------------------------------------------------------

    async def run_batches(self) -> None:
        """Forever: wait for jobs and for not being paused, run all queued jobs that share the first
        job's parameters as one batch."""
        loop = asyncio.get_running_loop()
        while True:
            await self.wakeup.wait()
            await self.running.wait()
            if not self.jobs:
                self.wakeup.clear()
                continue
            params = self.jobs[0].params
            batch = [j for j in self.jobs if j.params == params and not j.future.done()]
            self.jobs = [j for j in self.jobs if j.params != params and not j.future.done()]
            if not self.jobs:
                self.wakeup.clear()
            if not batch:
                continue
            prompts = [p for j in batch for p in j.prompts]
            try:
                completions = await loop.run_in_executor(self.worker, self.engine.generate, prompts, params)
            except Exception as e:  # noqa: BLE001 - answered to each waiting request
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            k = 0
            for j in batch:
                count = len(j.prompts) * params.n
                if not j.future.done():
                    j.future.set_result(completions[k : k + count])
                k += count

    async def generate(self, request):
        from aiohttp import web

        try:
            prompts, params, single = parse_generate_body(await request.json())
        except (BadRequest, ValueError) as e:
            return web.json_response({"error": {"message": str(e)}}, status=400)
        job = _Job(prompts, params, asyncio.get_running_loop().create_future())
        self.jobs.append(job)
        self.wakeup.set()
        try:
            completions = await job.future
        except ValueError as e:  # bad prompt (token id out of range, too long)
            return web.json_response({"error": {"message": str(e)}}, status=400)
        latency = time.perf_counter() - job.received
        # completions come prompt-major, n per prompt (their prompt_index counts over the whole batch)
        items = [response_item(c, len(prompts[k // params.n]), params, latency) for k, c in enumerate(completions)]
        return web.json_response(items[0] if single and params.n == 1 else items)

    # -- control ------------------------------------------------------------------------------------

    async def health(self, request):
        from aiohttp import web

        return web.Response(status=200)

    async def model_info(self, request):
        from aiohttp import web

        version = self.engine.weight_version
        return web.json_response({
            "model_path": self.model_path,
            "tokenizer_path": None,
            "is_generation": True,
            "weight_version": protocol.DEFAULT_WEIGHT_VERSION if version < 0 else str(version),
        })

    async def flush_cache(self, request):
        from aiohttp import web

        return web.Response(text="Cache flushed.\n")

    async def pause(self, request):
        from aiohttp import web

        self.running.clear()
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def resume(self, request):
        from aiohttp import web

        self.running.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def update_weights_from_disk(self, request):
        from aiohttp import web

        body = await request.json()
        path, version = body.get("model_path"), body.get("weight_version")
        try:
            if not isinstance(path, str) or not path:
                raise BadRequest("model_path: expected a directory path")
            number = protocol.parse_weight_version(version) if version is not None else self.engine.weight_version + 1
            await asyncio.get_running_loop().run_in_executor(self.worker, load_weights_from_disk, self.engine, path, number)
        except Exception as e:  # noqa: BLE001 - SGLang answers failures as success: false + message
            return web.json_response({"success": False, "message": f"{type(e).__name__}: {e}", "num_paused_requests": 0}, status=400)
        self.model_path = path
        return web.json_response({
            "success": True,
            "message": f"Succeeded to update model weights. Weight version updated to {version}.",
            "num_paused_requests": 0,
        })

    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=1024**3)
        app.router.add_post("/generate", self.generate)
        app.router.add_put("/generate", self.generate)
        for path in ("/health", "/health_generate"):
            app.router.add_get(path, self.health)
        for path in ("/get_model_info", "/model_info"):
            app.router.add_get(path, self.model_info)
        app.router.add_get("/flush_cache", self.flush_cache)
        app.router.add_post("/flush_cache", self.flush_cache)
        app.router.add_post("/pause_generation", self.pause)
        app.router.add_post("/continue_generation", self.resume)
        app.router.add_post("/update_weights_from_disk", self.update_weights_from_disk)

        async def start_batcher(app):
            app["batcher"] = asyncio.create_task(self.run_batches())

        async def stop_batcher(app):
            app["batcher"].cancel()
            self.worker.shutdown(wait=False, cancel_futures=True)

        app.on_startup.append(start_batcher)
        app.on_cleanup.append(stop_batcher)
        return app


def load_weights_from_disk(engine, path: str, version: int) -> None:
    """Streams every tensor of a safetensors directory (sharded or not) into the engine."""
    from megatron_nft.model.hf_io import hf_tensor_reader, hf_weight_map

    names = list(hf_weight_map(path))
    fetch = hf_tensor_reader(path)
    engine.update_weights(((n, fetch(n)) for n in names), version)


def build_engine(model_path: str, load_format: str, seed: int, max_batch_size: int):
    from megatron_nft.model.hf_io import load_hf_config
    from megatron_nft.rollout.local import LocalEngine

    engine = LocalEngine(load_hf_config(model_path), seed=seed, max_batch_size=max_batch_size)
    if load_format == "dummy":
        # SGLang's --load-format dummy: random weights, version "default" until the first update.
        engine.update_weights([(n, p.detach().clone()) for n, p in engine.model.named_parameters()], version=-1)
    else:
        load_weights_from_disk(engine, model_path, version=-1)
    return engine


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True, help="HF checkpoint directory (config.json [+ safetensors])")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                        help="auto: weights from --model-path; dummy: random weights (a weight sync follows)")
    parser.add_argument("--random-seed", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)

    import torch
    from aiohttp import web

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(args.model_path, args.load_format, args.random_seed, args.max_batch_size)

    async def serve():
        runner = web.AppRunner(LocalServer(engine, args.model_path).app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        print(f"local rollout server ready on http://{args.host}:{args.port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
