"""The commands a launch runs, as NeMo-Run tasks (run.Script): the trainer and the SGLang servers.

Locally the trainer is `python -m megatron_nft.cli ...` under NeMo-Run's torchrun launcher. On Slurm it
is an inline script that srun starts once per trainer node and that runs torchrun itself: the script
waits for the rollout servers, adds `run.resume=true` when Slurm requeued the job, and rendezvouses at
$NFT_TRAINER_HOST. That variable and $NFT_ROLLOUT_URLS are set in the sbatch script from NeMo-Run's
host macros (the first node of a heterogeneous group, or the allocation's head node), which is how
trainers find each other and the servers without knowing hostnames in advance.
"""

from __future__ import annotations

import shlex

from launch.config import LaunchConfig
from megatron_nft.rollout.servers import DETERMINISTIC_FLAG

# The image keeps SGLang in its own virtual environment: it pins its own torch, which must not
# replace the NGC build that Transformer Engine and apex are compiled against (Dockerfile).
SGLANG_PYTHON = "/opt/sglang/bin/python"
# Log-file-friendly output on clusters: no progress bars redrawn with carriage returns.
SLURM_TRAINER_FLAGS = ("--quiet",)


def trainer_arguments(cfg: LaunchConfig) -> list[str]:
    """`megatron-nft` arguments: command and flags, recipe, then overrides (the user's last, so they win;
    flags before the overrides, which argparse reads as one trailing list)."""
    job, cluster = cfg.job, cfg.cluster
    args = [job.command, *(SLURM_TRAINER_FLAGS if job.executor == "slurm" else ())]
    if job.train_recipe:
        args += ["--recipe", job.train_recipe]
    if job.hf_model:
        args.append(f"model.hf_path={cluster.models_dir.rstrip('/')}/{job.hf_model}")
    if job.executor == "slurm":
        args.append(f"run.dir={cfg.run_dir}")
        if job.rollout_nodes:
            # what the trainer must know of the servers it feeds: ranks per server (the broadcast
            # group's size, the tensor payloads per server) and replicas (tensor and broadcast
            # weight updates need --dp-size 1; config validation refuses them otherwise)
            args += ["rollout.engine=sglang", f"rollout.server_tp_size={job.rollout_tp}",
                     f"rollout.server_dp_size={rollout_dp(cfg)}"]
    return args + list(job.train_overrides)


def rollout_dp(cfg: LaunchConfig) -> int:
    """SGLang --dp-size of each rollout server: data-parallel replicas filling its node."""
    return cfg.job.gpus_per_node // cfg.job.rollout_tp


def local_trainer(cfg: LaunchConfig):
    """`torchrun -m megatron_nft.cli ...` through LocalExecutor(launcher="torchrun")."""
    import nemo_run as run

    return run.Script(path="megatron_nft.cli", m=True, entrypoint="python", args=trainer_arguments(cfg))


def rollout_urls(cfg: LaunchConfig, first_group: int = 1) -> str:
    """Comma-separated server URLs from the het-group host macros (rollout groups follow the trainer)."""
    from nemo_run.core.execution.base import ExecutorMacros

    return ",".join(
        f"http://{ExecutorMacros.group_host(first_group + i)}:{cfg.job.rollout_port}" for i in range(cfg.job.rollout_nodes)
    )


def slurm_trainer(cfg: LaunchConfig, *, heterogeneous: bool):
    """One task per trainer node; it starts torchrun with job.gpus_per_node processes."""
    import nemo_run as run
    from nemo_run.core.execution.base import ExecutorMacros

    job = cfg.job
    env = {
        # het: the trainer group (group 0) first node; otherwise the allocation's head node
        "NFT_TRAINER_HOST": ExecutorMacros.group_host(0) if heterogeneous else "$$" + ExecutorMacros.HEAD_NODE_IP_VAR,
    }
    lines = [
        "set -euo pipefail",
        "# Runs once per trainer node (srun, one task per node) and starts torchrun there.",
    ]
    if job.rollout_nodes:
        env["NFT_ROLLOUT_URLS"] = rollout_urls(cfg)
        lines.append(f'python -m launch.wait_for_servers "$NFT_ROLLOUT_URLS" --timeout {job.server_timeout_s}')
    args = " ".join(shlex.quote(a) for a in trainer_arguments(cfg))
    if job.rollout_nodes:
        args += ' "rollout.urls=[$NFT_ROLLOUT_URLS]"'
    config_file = shlex.quote(f"{cfg.run_dir}/config.yaml")
    checkpoints = shlex.quote(f"{cfg.run_dir}/checkpoints")
    lines += [
        f"set -- {args}",
        "# a job that Slurm requeued after a failure continues its run directory from its newest checkpoint;",
        "# one that failed before its first checkpoint starts that run again (resume would refuse: nothing to resume)",
        f'if [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ] && [ -n "$(ls -d {checkpoints}/step_[0-9]* 2>/dev/null)" ]; '
        f'then set -- "$@" run.resume=true; '
        f'elif [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ] && [ -e {config_file} ]; then set -- "$@" run.overwrite=true; fi',
        f"exec torchrun --nnodes={job.trainer_nodes} --nproc-per-node={job.gpus_per_node} --rdzv-backend=c10d "
        f'--rdzv-endpoint="$NFT_TRAINER_HOST:{job.rendezvous_port}" --rdzv-id="$SLURM_JOB_ID" -m megatron_nft.cli "$@"',
    ]
    return run.Script(inline="\n".join(lines) + "\n", env=env)


def sglang_server(cfg: LaunchConfig):
    """One SGLang server per rollout node: TP rollout_tp, data-parallel replicas filling the node."""
    import nemo_run as run

    job = cfg.job
    model = f"{cfg.cluster.models_dir.rstrip('/')}/{job.hf_model}" if job.hf_model else None
    args = [
        *(["--model-path", model] if model else []),
        "--host", "0.0.0.0",
        "--port", str(job.rollout_port),
        "--tp-size", str(job.rollout_tp),
        "--dp-size", str(rollout_dp(cfg)),
        "--mem-fraction-static", str(job.rollout_mem_fraction),
        # SGLang uses the trainer's per-request sampling seeds only in this mode: resumes re-draw
        *([DETERMINISTIC_FLAG] if job.rollout_deterministic else []),
    ]
    return run.Script(path="sglang.launch_server", m=True, entrypoint=SGLANG_PYTHON, args=args)
