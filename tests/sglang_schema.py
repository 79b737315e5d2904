"""Checks our SGLang payloads with SGLang's own code, in a child process (run by the tests).

Importing sglang patches transformers (sglang/__init__.py) and takes tens of seconds, so it never
happens in the pytest process: tests write a JSON job to stdin and read a JSON report from stdout.

Job keys (all optional):
  requests:  [{"cls": io_struct class name, "body": {...}}]  -> report["requests"]: error or null each
             validated the way SGLang's FastAPI server does (pydantic over the msgspec struct /
             dataclass) plus: no key that the class lacks (pydantic would silently drop it), and for
             /generate the `sglang.api.v1` JSON contract and GenerateReqInput's own normalisation.
  responses: [item or list of items]  -> report["responses"]: error or null each, against the
             `sglang.api.v1` GenerateResponse contract.
  server_argv: [str]  -> report["server_args"]: the fields sglang.launch_server's parser makes of it.
  group: {master_address, master_port, rank, world_size, group_name, backend, body, out}
             joins the weight-update group with sglang.srt.utils.init_custom_process_group, receives
             the tensors described by the /update_weights_from_distributed `body` the way SGLang's
             model runner does (empty tensors + broadcast from rank 0) and torch.saves them to `out`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings


def check_request(cls_name: str, body: dict) -> str | None:
    import msgspec
    from pydantic import TypeAdapter

    from sglang.srt.managers import io_struct

    cls = getattr(io_struct, cls_name)
    if dataclasses.is_dataclass(cls):
        fields = {f.name for f in dataclasses.fields(cls)}
    else:
        fields = {f.name for f in msgspec.structs.fields(cls)}
    unknown = sorted(set(body) - fields)
    if unknown:
        return f"{cls_name} has no field(s) {unknown}"
    try:
        obj = TypeAdapter(cls).validate_python(body)
    except Exception as e:  # noqa: BLE001 - reported
        return f"{cls_name}: {type(e).__name__}: {e}"
    if cls_name == "GenerateReqInput":
        from sglang.srt.entrypoints.api_contract import generate_contract_error

        error = generate_contract_error(body)
        if error is not None:
            return f"/generate contract: {error}"
        try:
            obj.normalize_batch_and_arguments()
        except Exception as e:  # noqa: BLE001
            return f"GenerateReqInput.normalize_batch_and_arguments: {type(e).__name__}: {e}"
    return None


def check_response(payload) -> str | None:
    from sglang.api.v1.api_types import GenerateResponse, JsonContractError

    try:
        for item in payload if isinstance(payload, list) else [payload]:
            GenerateResponse.from_json_value(item)
    except JsonContractError as e:
        return str(e)
    return None


def parse_server_args(argv: list[str]) -> dict:
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    keys = ("model_path", "host", "port", "tp_size", "mem_fraction_static", "random_seed", "dtype", "load_format")
    return {k: getattr(args, k, None) for k in keys}


def receive_group(spec: dict) -> None:
    import torch
    import torch.distributed as dist

    from sglang.srt.utils import init_custom_process_group

    group = init_custom_process_group(
        backend=spec["backend"],
        init_method=f"tcp://{spec['master_address']}:{spec['master_port']}",
        world_size=spec["world_size"],
        rank=spec["rank"],
        group_name=spec["group_name"],
    )
    body = spec["body"]
    received = {}
    for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
        weight = torch.empty(shape, dtype=getattr(torch, dtype))
        dist.broadcast(weight, src=0, group=group)
        received[name] = weight
    torch.save(received, spec["out"])


def main() -> None:
    warnings.filterwarnings("ignore")
    # Import first, read the job second: the tests start this process early and write the job when
    # they have it, so the slow import overlaps with their own set-up.
    import sglang.api.v1.api_types  # noqa: F401
    import sglang.srt.entrypoints.api_contract  # noqa: F401
    import sglang.srt.managers.io_struct  # noqa: F401

    job = json.load(sys.stdin)
    report = {}
    report["requests"] = [check_request(r["cls"], r["body"]) for r in job.get("requests", [])]
    report["responses"] = [check_response(p) for p in job.get("responses", [])]
    if "server_argv" in job:
        report["server_args"] = parse_server_args(job["server_argv"])
    if "group" in job:
        receive_group(job["group"])
        report["group"] = "received"
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
