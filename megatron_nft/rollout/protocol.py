"""SGLang's native HTTP API as JSON: the bodies we send and how we read what comes back.

One place for the wire format, used by the SGLang client, the weight sync and the local HTTP
server (which serves the same subset). Field names are SGLang 0.5.23's
(`sglang.srt.managers.io_struct` and the `sglang.api.v1` JSON contract); tests build every body
below as SGLang's own request objects, so an upstream rename fails them.

/generate response, one item per (prompt, sample) in prompt-major order (a single prompt with n=1
gets the bare object, anything else a list):

    {"text": ..., "output_ids": [int, ...],
     "meta_info": {"id": str, "finish_reason": {"type": "stop", "matched": int}
                                            | {"type": "length", "length": int}
                                            | {"type": "abort", "message": str, ...},
                   "prompt_tokens": int, "completion_tokens": int, "cached_tokens": int,
                   "output_token_logprobs": [[logprob, token_id, text|null], ...],
                   "weight_version": str, ...}}

`output_ids` keep the matched stop token (only `text` is trimmed), and `output_token_logprobs` has
one entry per output id, so a completion here ends with its stop token exactly like the local
engine's. `weight_version` is the string the last weight update set ("default" before any).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_nft.rollout.base import FINISH_LENGTH, FINISH_STOP, SamplingParams

FINISH_ABORT = "abort"
# SGLang reports this weight version until a weight update names one.
DEFAULT_WEIGHT_VERSION = "default"
# pause_generation mode for weight updates: running requests go back to the waiting queue and are
# recomputed after continue_generation ("abort" would return them truncated).
PAUSE_MODE = "retract"


class ProtocolError(RuntimeError):
    """A server answered with something that is not SGLang's response format."""


class AbortedError(RuntimeError):
    """The server aborted a request (finish_reason type "abort"); sending it again may succeed."""


# ----------------------------------------------------------------------------------------------------
# /generate
# ----------------------------------------------------------------------------------------------------


def generate_body(prompts: list[list[int]], params: SamplingParams) -> dict:
    """A /generate body for `prompts` (token ids) with per-token output log-probs.

    One prompt is sent as a flat `input_ids` list, several as a batch; `logprob_start_len=-1` asks
    for output log-probs only (no prompt log-probs).
    """
    if not prompts:
        raise ValueError("generate_body: no prompts")
    ids = [list(map(int, p)) for p in prompts]
    return {
        "input_ids": ids[0] if len(ids) == 1 else ids,
        "sampling_params": params.to_sglang(),
        "return_logprob": True,
        "logprob_start_len": -1,
    }


@dataclass
class Sample:
    """One generated answer as the server reported it."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # FINISH_STOP | FINISH_LENGTH
    weight_version: int  # -1 when the server reports none (or "default")


def parse_weight_version(value) -> int:
    """SGLang's weight_version string as our integer version; -1 for "default"/missing."""
    if value is None or value == DEFAULT_WEIGHT_VERSION:
        return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ProtocolError(f"meta_info.weight_version={value!r}: expected an integer string") from None


def parse_generate_response(payload, num_prompts: int, n: int) -> list[list[Sample]]:
    """Splits a /generate response into `n` samples for each of `num_prompts` prompts.

    Raises AbortedError when any item was aborted, ProtocolError when the payload is malformed.
    """
    items = payload if isinstance(payload, list) else [payload]
    if len(items) != num_prompts * n:
        raise ProtocolError(f"/generate returned {len(items)} items, expected {num_prompts} prompts x n={n}")
    samples = [_parse_item(item, i) for i, item in enumerate(items)]
    return [samples[p * n : (p + 1) * n] for p in range(num_prompts)]


def _parse_item(item, index: int) -> Sample:
    if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
        raise ProtocolError(f"/generate item {index}: expected an object with meta_info, got {_short(item)}")
    meta = item["meta_info"]
    finish = meta.get("finish_reason")
    kind = finish.get("type") if isinstance(finish, dict) else None
    if kind == FINISH_ABORT:
        raise AbortedError(f"/generate item {index} aborted: {finish.get('message')}")
    if kind not in (FINISH_STOP, FINISH_LENGTH):
        raise ProtocolError(f"/generate item {index}: meta_info.finish_reason={_short(finish)}, expected type stop or length")
    ids = item.get("output_ids")
    entries = meta.get("output_token_logprobs")
    if not isinstance(ids, list) or not isinstance(entries, list):
        raise ProtocolError(f"/generate item {index}: output_ids and meta_info.output_token_logprobs must be lists")
    if len(ids) != len(entries):
        raise ProtocolError(
            f"/generate item {index}: {len(ids)} output_ids but {len(entries)} output_token_logprobs"
        )
    logprobs = []
    for t, (token, entry) in enumerate(zip(ids, entries)):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise ProtocolError(f"/generate item {index}: output_token_logprobs[{t}]={_short(entry)}, expected [logprob, token_id, text]")
        logprob, entry_token = entry[0], entry[1]
        if entry_token != token:
            raise ProtocolError(f"/generate item {index}: output_token_logprobs[{t}] is for token {entry_token}, output_ids[{t}]={token}")
        if not isinstance(logprob, (int, float)) or math.isnan(logprob):
            raise ProtocolError(f"/generate item {index}: output_token_logprobs[{t}] has log-prob {logprob!r}")
        logprobs.append(float(logprob))
    return Sample(
        token_ids=[int(t) for t in ids],
        logprobs=logprobs,
        finish_reason=kind,
        weight_version=parse_weight_version(meta.get("weight_version")),
    )


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 120 else text[:117] + "..."


# ----------------------------------------------------------------------------------------------------
# weight updates and generation control
# ----------------------------------------------------------------------------------------------------


def update_from_disk_body(model_path: str, version: int) -> dict:
    """/update_weights_from_disk: load the safetensors files under `model_path`, stamp `version`."""
    return {"model_path": str(model_path), "weight_version": str(version), "flush_cache": True, "abort_all_requests": False}


def init_group_body(master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str, backend: str) -> dict:
    """/init_weights_update_group: the server's ranks join the trainer's broadcast group."""
    return {
        "master_address": master_address,
        "master_port": int(master_port),
        "rank_offset": int(rank_offset),
        "world_size": int(world_size),
        "group_name": group_name,
        "backend": backend,
    }


def destroy_group_body(group_name: str) -> dict:
    """/destroy_weights_update_group: the server's ranks leave the broadcast group."""
    return {"group_name": group_name}


def update_from_distributed_body(names, dtypes, shapes, group_name: str, version: int) -> dict:
    """/update_weights_from_distributed: receive these tensors by broadcast from group rank 0.

    `dtypes` are torch dtype names without the "torch." prefix (SGLang does getattr(torch, name)).
    Every bucket stamps the version (the servers are paused for the whole sync, so no request sees
    a half-updated model) and none flushes the cache: sync_weights flushes once at the end.
    """
    return {
        "names": list(names),
        "dtypes": list(dtypes),
        "shapes": [list(map(int, s)) for s in shapes],
        "group_name": group_name,
        "flush_cache": False,
        "abort_all_requests": False,
        "weight_version": str(version),
    }


def update_from_tensor_body(serialized: list[str], version: int) -> dict:
    """/update_weights_from_tensor: one base64 ForkingPickler payload per server tensor-parallel rank
    (version and cache flush as in update_from_distributed_body)."""
    return {
        "serialized_named_tensors": list(serialized),
        "flush_cache": False,
        "abort_all_requests": False,
        "weight_version": str(version),
    }


def begin_update_body() -> dict:
    """/begin_weight_update: opens SGLang's weight-update session (all runners: the model and any
    draft model). /update_weights_from_distributed and /update_weights_from_tensor are refused
    (`success: false`) outside one; /update_weights_from_disk needs none."""
    return {"selector": "all"}


def end_update_body() -> dict:
    """/end_weight_update: closes the session /begin_weight_update opened."""
    return {}


# Routes that SGLang 0.5.23 serves only inside a weight-update session and only with dp_size == 1
# (its scheduler's weight updater and tokenizer manager; /init_weights_update_group: dp_size == 1 only).
SESSION_ROUTES = ("/update_weights_from_distributed", "/update_weights_from_tensor")
SINGLE_DP_ROUTES = ("/destroy_weights_update_group", "/init_weights_update_group", "/update_weights_from_distributed",
                    "/update_weights_from_tensor")


def pause_body() -> dict:
    return {"mode": PAUSE_MODE}


def continue_body() -> dict:
    return {}
