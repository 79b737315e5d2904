"""Rollout engines: the interface the trainer uses, the local CPU engine, and the SGLang HTTP backend.

    engine = make_engine(cfg.rollout, hf_config=..., model_path=cfg.model.hf_path, run_dir=run_dir)
    engine.update_weights(actor.hf_tensors(), version)   # HF-named stream, every tensor once
    completions = engine.generate(prompt_ids, SamplingParams(temperature=1.0, n=16, max_new_tokens=...))

Engines (`rollout.engine`): "local" (LocalEngine in this process), "local_http" (LocalEngine behind
SGLang's HTTP API in server processes: the SGLang code path on CPU) and "sglang" (SGLang servers).
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_nft.rollout.base import FINISH_LENGTH, FINISH_STOP, Completion, RolloutEngine, SamplingParams
from megatron_nft.rollout.local import LocalEngine

__all__ = [
    "Completion", "FINISH_LENGTH", "FINISH_STOP", "LocalEngine", "RolloutEngine", "SamplingParams", "make_engine",
]


def make_engine(cfg, *, hf_config, model_path: str | None, run_dir: str | Path, seed: int = 0,
                progress: bool = False) -> RolloutEngine:
    """The engine `cfg` (a config.RolloutConfig) asks for, ready to take a weight update.

    HTTP engines attach to `cfg.urls` or launch `cfg.num_servers` servers from `model_path` (their
    logs go to <run_dir>/rollout_servers/) and wait until they answer /health_generate.
    """
    if cfg.engine == "local":
        return LocalEngine(hf_config, seed=seed)
    from megatron_nft.rollout import servers as srv
    from megatron_nft.rollout.sglang_client import SGLangEngine

    run_dir = Path(run_dir)
    if cfg.weight_transport == "nccl" and cfg.sglang_python:
        # before any server starts: NCCL refuses peers of another version, which the first sync
        # would otherwise find out after the servers have loaded
        from megatron_nft.rollout.nccl_version import check_nccl_alignment

        check_nccl_alignment(cfg.sglang_python)
    transport = _make_transport(cfg, run_dir)
    launched: list = []
    urls = list(cfg.urls)
    if not urls:
        if model_path is None:
            raise ValueError(f"rollout.engine={cfg.engine} launches servers from model.hf_path; none is set (or give rollout.urls)")
        ports = ([cfg.server_base_port + i for i in range(cfg.num_servers)] if cfg.server_base_port
                 else srv.free_ports(cfg.num_servers))
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        envs = None
        if cfg.engine == "sglang":
            # the trainer's local ranks hold GPUs 0..L-1 of this node; the servers take others
            groups = srv.gpu_groups(cfg.num_servers, cfg.server_tp_size * cfg.server_dp_size,
                                    trainer_gpus=trainer_local_gpus(), server_gpus=cfg.server_gpus)
            commands = [srv.sglang_command(model_path, port=p, tp_size=cfg.server_tp_size, dp_size=cfg.server_dp_size,
                                           mem_fraction_static=cfg.server_mem_fraction, random_seed=seed + i,
                                           deterministic=cfg.server_deterministic, extra_args=cfg.server_args,
                                           python=cfg.sglang_python or sys.executable)
                        for i, p in enumerate(ports)]
            envs = [{"CUDA_VISIBLE_DEVICES": g} for g in groups]
        else:
            commands = [srv.local_server_command(model_path, port=p, load_format="dummy", random_seed=seed + i,
                                                 tp_size=cfg.server_tp_size, dp_size=cfg.server_dp_size,
                                                 deterministic=cfg.server_deterministic, extra_args=cfg.server_args)
                        for i, p in enumerate(ports)]
        launched = srv.launch_servers(list(zip(commands, urls)), run_dir / "rollout_servers", envs)
    engine = SGLangEngine(urls, transport=transport, bucket_bytes=cfg.weight_bucket_mb * 1024**2,
                          max_concurrency=cfg.max_concurrency, request_timeout_s=cfg.request_timeout_s,
                          max_retries=cfg.max_retries, progress=progress, servers=launched)
    try:
        engine.wait_ready(timeout_s=cfg.server_start_timeout_s)
    except BaseException:
        engine.close()
        raise
    return engine


def trainer_local_gpus() -> int:
    """GPUs the trainer uses on this node: one per local rank (torchrun's LOCAL_WORLD_SIZE; 1 when
    run without torchrun on a GPU machine, 0 on a CPU-only one)."""
    import os

    import torch

    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if torch.cuda.is_available() else 0


def _make_transport(cfg, run_dir: Path):
    from megatron_nft.rollout import weight_sync as ws

    if cfg.weight_transport == "disk":
        return ws.DiskTransport(cfg.weight_sync_dir or run_dir / "weight_sync")
    if cfg.weight_transport == "nccl":
        from megatron_nft.runtime import free_port

        return ws.NcclBroadcastTransport(cfg.nccl_master_address, cfg.nccl_master_port or free_port(),
                                         ranks_per_server=cfg.server_tp_size)
    return ws.CudaIpcTransport(ranks_per_server=cfg.server_tp_size)
