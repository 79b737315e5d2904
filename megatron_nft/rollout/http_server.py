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
  GET  /server_info                tp_size, dp_size, enable_deterministic_inference, ... (launch flags)
  POST /update_weights_from_disk   model_path (safetensors + optional index), weight_version

SGLang 0.5.23's weight-update rules, as its scheduler and tokenizer manager apply them:
  POST /begin_weight_update        opens the session (400, success false, if one is open)
  POST /end_weight_update          closes it (400 if none is open); the tensors received in the
                                   session are loaded here, as one complete update (stricter than
                                   SGLang, which loads each bucket: a missing tensor is an error)
  POST /init_weights_update_group  joins a trainer broadcast group (gloo on CPU); several at once, by
                                   group name, as SGLang's weight updater keeps them (one per stage)
  POST /update_weights_from_distributed   receives a bucket by broadcast from group rank 0
  POST /destroy_weights_update_group      leaves it
  POST /update_weights_from_tensor        one ForkingPickler payload per tensor-parallel rank (CPU
                                   shared memory, or CUDA IPC with device UUIDs on a GPU machine),
                                   each rank unpickling only its own, through an allow-list
The tensor and distributed routes answer 400 with success false outside a session (the broadcast is
then not joined, as in SGLang); those two and the group routes fail with HTTP 500 on a server started
with --dp-size > 1 (SGLang asserts dp_size == 1 there): ROUTE_RULES, applied to every route by one
guard. --tp-size N makes the tensor route expect N payloads; the broadcast route joins one rank per
server (--tp-size 1 only). Per-request sampling_seed is honoured only with
--enable-deterministic-inference, as in SGLang; without it a request samples from the server's own
generator.

Concurrent /generate requests with the same sampling parameters are batched into one
LocalEngine.generate call (what SGLang's scheduler does continuously); generation and weight loads
run on one worker thread, so a weight update never lands in the middle of a batch. With
`sampling_seed`, a request's samples depend on what it was batched with.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import pickle
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
import dataclasses
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


def parse_sampling_params(raw, *, deterministic: bool = True) -> SamplingParams:
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
    if raw.get("sampling_seed") is not None and deterministic:
        kwargs["seed"] = raw["sampling_seed"]
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise BadRequest(f"sampling_params: {e}") from None


def parse_generate_body(body, *, deterministic: bool = True) -> tuple[list[list[int]], SamplingParams, bool]:
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
    return prompts, parse_sampling_params(raw, deterministic=deterministic), single


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


@dataclass
class ServerFlags:
    """The launch flags SGLang reports in /server_info and that change what this server accepts."""

    tp_size: int = 1
    dp_size: int = 1
    enable_deterministic_inference: bool = False
    random_seed: int = 0


@dataclass
class _Session:
    """An open weight-update session: what it received, in order, and the last version stamped."""

    staged: dict = field(default_factory=dict)
    version: int | None = None


def _dp_refusal():
    """What SGLang answers when an assert dp_size == 1 fails in a route: FastAPI's plain 500."""
    from aiohttp import web

    return web.Response(status=500, text="Internal Server Error")


def _refused(message: str, status: int = 400):
    from aiohttp import web

    return web.json_response({"success": False, "message": message}, status=status)


# SGLang 0.5.23's preconditions of the weight-update routes, checked before the route runs: an
# `assert dp_size == 1` in its tokenizer manager (a plain 500 there) and an open weight-update session
# in its scheduler (400, success false, "<route> must run between ...").
SINGLE_REPLICA, IN_SESSION = "single replica", "in session"
ROUTE_RULES = {
    "/init_weights_update_group": (SINGLE_REPLICA,),
    "/destroy_weights_update_group": (SINGLE_REPLICA,),
    "/update_weights_from_distributed": (SINGLE_REPLICA, IN_SESSION),
    "/update_weights_from_tensor": (SINGLE_REPLICA, IN_SESSION),
}


class LocalServer:
    """The application state: one LocalEngine, a queue of /generate jobs and a pause switch."""

    def __init__(self, engine, model_path: str, flags: ServerFlags | None = None):
        self.engine, self.model_path = engine, model_path
        self.flags = flags or ServerFlags()
        self.session: _Session | None = None
        self.groups: dict = {}  # group name -> process group joined by /init_weights_update_group
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-engine")
        # broadcasts block until the trainer feeds them: never on the generation worker
        self.receiver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-receiver")
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
            prompts, params, single = parse_generate_body(
                await request.json(), deterministic=self.flags.enable_deterministic_inference)
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

    async def server_info(self, request):
        from aiohttp import web

        return web.json_response({"model_path": self.model_path, **dataclasses.asdict(self.flags)})

    # -- weight-update sessions and the tensor / broadcast routes (SGLang's rules: module docstring) --

    def refusal(self, path: str):
        """What the route at `path` answers instead of running (ROUTE_RULES), or None."""
        rules = ROUTE_RULES.get(path, ())
        if SINGLE_REPLICA in rules and self.flags.dp_size != 1:
            return _dp_refusal()
        if IN_SESSION in rules and self.session is None:
            return _refused(f"{path.lstrip('/')} must run between begin_weight_update() and end_weight_update()")
        return None

    async def begin_weight_update(self, request):
        from aiohttp import web

        if self.session is not None:
            return _refused("a weight-update session is already open; call end_weight_update() first")
        self.session = _Session()
        return web.json_response({"success": True, "message": "Success"})

    async def end_weight_update(self, request):
        from aiohttp import web

        if self.session is None:
            return _refused("no weight-update session is open; call begin_weight_update() first")
        session, self.session = self.session, None
        if session.staged:
            version = session.version if session.version is not None else self.engine.weight_version + 1
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self.worker, self.engine.update_weights, list(session.staged.items()), version)
            except ValueError as e:
                return _refused(f"the session's tensors are not a complete update: {e}")
        return web.json_response({"success": True, "message": "Success"})

    def _stage(self, tensors, version) -> None:
        if self.session is None:  # closed while this request's tensors arrived
            raise BadRequest("the weight-update session was closed before these tensors arrived")
        for name, tensor in tensors:
            if name in self.session.staged:
                raise BadRequest(f"tensor {name!r} received twice in one weight-update session")
            self.session.staged[name] = tensor
        if version is not None:
            self.session.version = protocol.parse_weight_version(version)

    async def update_weights_from_tensor(self, request):
        from aiohttp import web

        body = await request.json()
        payloads = body.get("serialized_named_tensors")
        try:
            if not isinstance(payloads, list) or len(payloads) < self.flags.tp_size:
                raise BadRequest(f"serialized_named_tensors: expected one payload per tensor-parallel rank "
                                 f"({self.flags.tp_size}), got {len(payloads) if isinstance(payloads, list) else payloads!r}")
            # each rank deserializes only its own entry, as SGLang's TP workers do
            per_rank = await asyncio.get_running_loop().run_in_executor(
                self.receiver, lambda: [received_copies(payloads[r]) for r in range(self.flags.tp_size)])
            for r, tensors in enumerate(per_rank[1:], 1):
                if [n for n, _ in tensors] != [n for n, _ in per_rank[0]] or not all(
                        torch_equal(a, b) for (_, a), (_, b) in zip(tensors, per_rank[0])):
                    raise BadRequest(f"serialized_named_tensors[{r}] differs from entry 0: every rank must get the same tensors")
            self._stage(per_rank[0], body.get("weight_version"))
        except Exception as e:  # noqa: BLE001 - SGLang answers failures as success: false + message
            return _refused(f"{type(e).__name__}: {e}")
        return web.json_response({"success": True, "message": "Success"})

    async def init_weights_update_group(self, request):
        from aiohttp import web

        body = await request.json()
        try:
            if self.flags.tp_size != 1:
                raise BadRequest("the local server joins one rank per server: start it with --tp-size 1 for broadcasts")
            keys = ("master_address", "master_port", "rank_offset", "world_size", "group_name", "backend")
            missing = [k for k in keys if k not in body]
            if missing:
                raise BadRequest(f"{missing[0]}: missing")
            if body["backend"] != "gloo":
                raise BadRequest(f"backend={body['backend']!r}: the local server runs on CPU (gloo)")
            from megatron_nft.rollout.weight_sync import init_weight_update_group

            group = await asyncio.get_running_loop().run_in_executor(
                self.receiver, init_weight_update_group, body["master_address"], body["master_port"],
                body["rank_offset"], body["world_size"], body["group_name"], body["backend"])
        except Exception as e:  # noqa: BLE001
            return _refused(f"Failed to init group: {type(e).__name__}: {e}")
        self.groups[body["group_name"]] = group
        return web.json_response({"success": True, "message": "Succeeded to initialize custom process group."})

    async def destroy_weights_update_group(self, request):
        import torch.distributed as dist
        from aiohttp import web

        group = self.groups.pop((await request.json()).get("group_name"), None)
        if group is None:
            return _refused("The group to be destroyed does not exist.")
        dist.destroy_process_group(group)
        return web.json_response({"success": True, "message": "Succeeded to destroy custom process group."})

    async def update_weights_from_distributed(self, request):
        from aiohttp import web

        body = await request.json()
        try:
            group = self.groups.get(body.get("group_name"))
            if group is None:
                raise BadRequest(f"group_name={body.get('group_name')!r}: no such weight-update group (call /init_weights_update_group)")
            names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
            tensors = await asyncio.get_running_loop().run_in_executor(
                self.receiver, receive_broadcast, group, names, dtypes, shapes)
            self._stage(tensors, body.get("weight_version"))
        except Exception as e:  # noqa: BLE001
            return _refused(f"Failed to receive weights: {type(e).__name__}: {e}")
        return web.json_response({"success": True, "message": "Succeeded to update parameter online."})

    def app(self):
        from aiohttp import web

        @web.middleware
        async def guard(request, handler):  # ROUTE_RULES, for every route in one place
            refusal = self.refusal(request.path)
            return refusal if refusal is not None else await handler(request)

        app = web.Application(client_max_size=1024**3, middlewares=[guard])
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
        for path in ("/server_info", "/get_server_info"):
            app.router.add_get(path, self.server_info)
        app.router.add_post("/begin_weight_update", self.begin_weight_update)
        app.router.add_post("/end_weight_update", self.end_weight_update)
        app.router.add_post("/update_weights_from_tensor", self.update_weights_from_tensor)
        app.router.add_post("/init_weights_update_group", self.init_weights_update_group)
        app.router.add_post("/update_weights_from_distributed", self.update_weights_from_distributed)
        app.router.add_post("/destroy_weights_update_group", self.destroy_weights_update_group)

        async def start_batcher(app):
            app["batcher"] = asyncio.create_task(self.run_batches())

        async def stop_batcher(app):
            app["batcher"].cancel()
            self.worker.shutdown(wait=False, cancel_futures=True)
            self.receiver.shutdown(wait=False, cancel_futures=True)

        app.on_startup.append(start_batcher)
        app.on_cleanup.append(stop_batcher)
        return app


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and torch.equal(a, b)


def receive_broadcast(group, names, dtypes, shapes) -> list:
    """The receiving side of one /update_weights_from_distributed bucket: empty tensors of the
    announced dtypes and shapes, filled by broadcasts from group rank 0 in order."""
    import torch

    if not (len(names) == len(dtypes) == len(shapes)):
        raise BadRequest(f"names, dtypes, shapes: {len(names)}, {len(dtypes)}, {len(shapes)} entries")
    out = []
    for name, dtype, shape in zip(names, dtypes, shapes):
        tensor = torch.empty(shape, dtype=getattr(torch, dtype))
        group.broadcast(tensor, 0).wait()
        out.append((name, tensor))
    return out


class PayloadUnpickler(pickle.Unpickler):
    """Unpickles a /update_weights_from_tensor payload through an allow-list (as SGLang's
    SafeUnpickler does), rebuilding CUDA tensors on the GPU a device UUID names (as SGLang's
    patched rebuild_cuda_tensor does): a payload that carries a device index, or uses a sharing
    route an unrelated process cannot open, fails here as it would there."""

    REDUCTIONS = {"rebuild_tensor", "rebuild_cuda_tensor", "rebuild_storage_filename", "rebuild_storage_empty",
                  "rebuild_typed_storage", "rebuild_typed_storage_child", "rebuild_meta_tensor"}
    BUILTINS = {"list", "tuple", "dict", "int", "float", "bool", "str", "bytes", "slice"}

    def find_class(self, module, name):
        import torch

        if module == "torch.multiprocessing.reductions" and name == "rebuild_cuda_tensor":
            return _rebuild_cuda_tensor_by_uuid
        if module == "torch.multiprocessing.reductions" and name == "rebuild_storage_fd":
            raise pickle.UnpicklingError(
                "rebuild_storage_fd: a file-descriptor share can only be opened by the sender's own children; "
                "send CPU tensors as named shared memory (torch's file_system strategy)")
        allowed = (
            (module == "torch.multiprocessing.reductions" and name in self.REDUCTIONS)
            or (module == "builtins" and name in self.BUILTINS)
            or (module in ("torch", "torch.cuda") and (name.endswith(("Tensor", "Storage")) or name in ("Size", "device", "dtype")
                                                        or isinstance(getattr(torch, name, None), torch.dtype)))
            or (module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"))
            or (module == "torch._utils" and name.startswith("_rebuild_"))
            or (module == "torch._tensor" and name == "_rebuild_from_type_v2")
            or (module == "torch.nn.parameter" and name == "Parameter")
        )
        if not allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a tensor payload")
        return super().find_class(module, name)


_CUDA_DEVICE_ARG = 6  # the device's position in rebuild_cuda_tensor's arguments


def _rebuild_cuda_tensor_by_uuid(*args):
    import torch
    from torch.multiprocessing import reductions

    device = args[_CUDA_DEVICE_ARG]
    if isinstance(device, str):
        uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
        if device not in uuids:
            raise ValueError(f"CUDA device {device} is not visible to this server")
        device = uuids.index(device)
    return reductions.rebuild_cuda_tensor(*args[:_CUDA_DEVICE_ARG], device, *args[_CUDA_DEVICE_ARG + 1 :])


def received_copies(payload) -> list:
    """[(name, CPU tensor)] from one rank's payload: copies taken at once (the sender frees its memory
    once the server has answered), then the shared tensors released."""
    if not isinstance(payload, str):
        raise BadRequest("serialized_named_tensors entries: expected base64 strings")
    named = PayloadUnpickler(io.BytesIO(base64.b64decode(payload, validate=True))).load()
    if not isinstance(named, list) or not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in named):
        raise BadRequest("serialized_named_tensors: expected a pickled list of (name, tensor) pairs")
    return [(name, tensor.detach().to("cpu", copy=True)) for name, tensor in named]


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
    parser.add_argument("--tp-size", type=int, default=1,
                        help="tensor-parallel ranks SGLang would run: payloads expected per /update_weights_from_tensor")
    parser.add_argument("--dp-size", type=int, default=1,
                        help="data-parallel replicas SGLang would run (> 1: the tensor and broadcast routes fail, as there)")
    parser.add_argument("--enable-deterministic-inference", action="store_true",
                        help="honour per-request sampling_seed (SGLang ignores it without this flag)")
    args = parser.parse_args(argv)
    for flag in ("tp_size", "dp_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be >= 1")

    import torch
    from aiohttp import web

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(args.model_path, args.load_format, args.random_seed, args.max_batch_size)

    async def serve():
        flags = ServerFlags(tp_size=args.tp_size, dp_size=args.dp_size, random_seed=args.random_seed,
                            enable_deterministic_inference=args.enable_deterministic_inference)
        runner = web.AppRunner(LocalServer(engine, args.model_path, flags).app(), access_log=None)
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
