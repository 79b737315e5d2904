"""Run a function on N gloo ranks in subprocesses (for tests and benchmarks on machines without GPUs).

Each rank is a fresh spawned Python process (imports cost seconds: give one spawn many checks rather
than spawning per check). `fn(rank, world_size, *args)` must be importable by module path; its return
value (picklable) comes back in rank order; an exception on any rank is re-raised here with the rank's
traceback.

Every rank runs under the strict device mode (megatron_nft.strict_devices) unless `strict=False`: a
collective of this project's code that gets a host tensor where NCCL would need a CUDA one fails here
as it would on a GPU.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import traceback

import torch
import torch.multiprocessing as mp

from megatron_nft.runtime import free_port


def _entry(rank, world_size, port, fn, args, results, strict=True):
    from megatron_nft.parent_death import die_with_parent

    die_with_parent()  # a test process killed mid-run leaves no rank behind
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        # Two cores shared by all ranks: oversubscribing threads makes gloo ranks crawl.
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        # Serialised by value: torch's queue pickler would pass tensors as shared-memory handles that
        # die with this process.
        from megatron_nft.strict_devices import strict_devices

        buffer = io.BytesIO()
        with strict_devices() if strict else contextlib.nullcontext():
            result = fn(rank, world_size, *args)
        torch.save(result, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - report anything, including SystemExit, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        from megatron_nft import runtime

        runtime.destroy()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 900.0, strict: bool = True) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(rank, world_size, port, fn, args, results, strict), daemon=False)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, object] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks: no result within {timeout_s}s")
            if ok:
                outputs[rank] = torch.load(io.BytesIO(value), weights_only=True)  # tensors and plain containers
            else:
                failures.append(f"rank {rank}:\n{value}")
                break  # the other ranks are likely stuck in a collective
    finally:
        for p in procs:
            p.join(timeout=30 if not failures else 1)
            if p.is_alive():
                p.kill()
    if failures:
        raise RuntimeError(f"{fn.__name__} failed on {world_size} ranks\n" + "\n".join(failures))
    return [outputs[r] for r in range(world_size)]
