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
    keys = ("model_path", "host", "port", "tp_size", "dp_size", "mem_fraction_static", "random_seed", "dtype", "load_format",
            "enable_deterministic_inference")
    return {k: getattr(args, k, None) for k in keys}


def weight_update_rules() -> dict:
    """SGLang's own weight-update rules, from its installed code:
      session: (success, message) of its scheduler's SchedulerWeightUpdaterManager for a call
               sequence (stub runners, a one-rank gloo group for its barriers);
      status:  the HTTP status each route answers a failure with (its http_server.py, read by ast);
      single_dp: the routes whose tokenizer-manager method asserts dp_size == 1 (read by ast)."""
    import ast
    import types
    from pathlib import Path

    import torch.distributed as dist

    import sglang
    from sglang.srt.managers import io_struct
    from sglang.srt.managers.scheduler_components import weight_updater as wu

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    runner = types.SimpleNamespace(weight_updater=types.SimpleNamespace(
        begin_weight_update=lambda: None, end_weight_update=lambda run_post_load: None,
        update_weights_from_tensor=lambda named_tensors, load_format: (True, "Success")))
    worker = types.SimpleNamespace(weight_update_runners=lambda: [("target", runner)], deserialize_own_rank=lambda p: [])
    manager = object.__new__(wu.SchedulerWeightUpdaterManager)
    for name, value in dict(tp_worker=worker, draft_worker=None, memory_saver_adapter=None, flush_cache=lambda **_: True,
                            is_fully_idle=lambda **_: True, scheduler=types.SimpleNamespace(record_weight_version_change=lambda **_: None),
                            metrics_collector=None, offload_tags=set(), stashed_model_static_state=None, _session=None,
                            tp_cpu_group=None).items():
        setattr(manager, name, value)
    tensor = io_struct.UpdateWeightsFromTensorReqInput(serialized_named_tensors=[])
    dist_req = io_struct.UpdateWeightsFromDistributedReqInput(names=[], dtypes=[], shapes=[], group_name="g")
    calls = [("tensor", lambda: manager.update_weights_from_tensor(tensor)),
             ("distributed", lambda: manager.update_weights_from_distributed(dist_req)),
             ("end", lambda: manager.end_weight_update(io_struct.EndWeightUpdateReqInput())),
             ("begin", lambda: manager.begin_weight_update(io_struct.BeginWeightUpdateReqInput())),
             ("begin", lambda: manager.begin_weight_update(io_struct.BeginWeightUpdateReqInput())),
             ("tensor", lambda: manager.update_weights_from_tensor(tensor)),
             ("end", lambda: manager.end_weight_update(io_struct.EndWeightUpdateReqInput())),
             ("end", lambda: manager.end_weight_update(io_struct.EndWeightUpdateReqInput()))]
    session = []
    for label, call in calls:
        out = call()
        session.append([label, out.success, out.message])

    root = Path(sglang.__file__).parent / "srt"
    status = {}
    for node in ast.walk(ast.parse((root / "entrypoints" / "http_server.py").read_text())):
        if isinstance(node, ast.AsyncFunctionDef):
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "post"
                        and dec.args and isinstance(dec.args[0], ast.Constant)):
                    codes = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
                             and isinstance(n.value, ast.Name) and n.value.id == "HTTPStatus"}
                    status[dec.args[0].value] = sorted(codes - {"OK"})
    single_dp = []
    for node in ast.walk(ast.parse((root / "managers" / "tokenizer_control_mixin.py").read_text())):
        if isinstance(node, ast.AsyncFunctionDef):
            for n in ast.walk(node):
                if isinstance(n, ast.Assert) and "dp_size" in ast.unparse(n.test) and "== 1" in ast.unparse(n.test):
                    single_dp.append("/" + node.name)
                    break
    return {"session": session, "status": status, "single_dp": sorted(set(single_dp))}


def rebuild_cuda_payloads(spec: dict) -> list:
    """Each rank's payload through SGLang's own deserialization (tp_worker.deserialize_own_rank: its
    torch reduction patch, then MultiprocessingSerializer with its SafeUnpickler), torch's CUDA
    rebuild swapped for a recorder and the receiver's GPUs described by `spec["visible_uuids"]`:
    returns, per rank, the device index each tensor would be opened on."""
    import types

    import torch
    from torch.multiprocessing import reductions

    from sglang.srt.utils.common import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    uuids = spec["visible_uuids"]
    torch.cuda.device_count = lambda: len(uuids)
    torch.cuda.get_device_properties = lambda i: types.SimpleNamespace(uuid=uuids[i])
    monkey_patch_torch_reductions()
    opened = []
    reductions._rebuild_cuda_tensor_original = lambda *args: opened.append(args[6]) or torch.zeros(0)
    out = []
    for payload in spec["payloads"]:
        opened.clear()
        try:
            MultiprocessingSerializer.deserialize(payload)
            out.append(list(opened))
        except Exception as e:  # noqa: BLE001 - reported
            out.append(f"{type(e).__name__}: {e}")
    return out


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
    if job.get("weight_update_rules"):
        report["weight_update_rules"] = weight_update_rules()
    if "cuda_payloads" in job:  # last: it replaces torch's CUDA rebuild in this process
        report["cuda_payloads"] = rebuild_cuda_payloads(job["cuda_payloads"])
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    main()
