"""NeMo-Run executors from the launch config: LocalExecutor with torchrun, SlurmExecutor (container,
mounts, nodes, GPUs per node, account/partition, GitArchivePackager), and the heterogeneous variant."""

from __future__ import annotations

import os

from launch.config import LaunchConfig
from launch.tasks import STOP_SIGNAL, trainer_processes

# Seconds between the srun of one heterogeneous group and the next: the trainers wait for the
# servers' health themselves (launch/wait_for_servers.py), so no long fixed sleep is needed.
HET_GROUP_START_GAP_S = 5
# Every task's environment: offline Hugging Face libraries (compute nodes often have no internet and
# everything is in the image or the mounts), unbuffered logs.
BASE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def local_executor(cfg: LaunchConfig):
    """torchrun on this machine: job.gpus_per_node processes, less the GPUs lent to SGLang servers."""
    import nemo_run as run

    return run.LocalExecutor(
        ntasks_per_node=trainer_processes(cfg),
        launcher="torchrun",
        env_vars={**BASE_ENV, **cfg.cluster.env},
    )


def tunnel(cfg: LaunchConfig):
    """SSH to the login node when cluster.host is set; otherwise sbatch runs on this machine."""
    import nemo_run as run

    c = cfg.cluster
    if c.host:
        return run.SSHTunnel(host=c.host, user=c.user or "", job_dir=c.remote_job_dir)
    # sbatch on this machine: the job directory is the experiment's own (NeMo-Run's default layout)
    local = os.path.join(os.path.expanduser(c.experiments_dir), "experiments") if c.experiments_dir else ""
    return run.LocalTunnel(job_dir=c.remote_job_dir or local)


def cluster_env(cfg: LaunchConfig) -> dict[str, str]:
    """Every Slurm task's environment: BASE_ENV, the network interface NCCL and gloo bind to, caches on
    node-local disk (compiled Triton/FlashInfer kernels on a shared home are slow and race between
    nodes; $SLURM_JOB_ID is expanded by the batch script), then cluster.env."""
    c = cfg.cluster
    env = dict(BASE_ENV)
    if c.network_interface:
        env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = c.network_interface
    cache = f"{c.local_cache_dir.rstrip('/')}/megatron-nft-$SLURM_JOB_ID"
    env.update(TRITON_CACHE_DIR=f"{cache}/triton", TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor",
               FLASHINFER_WORKSPACE_BASE=f"{cache}/flashinfer", XDG_CACHE_HOME=f"{cache}/xdg")
    return {**env, **c.env}


def slurm_executor(cfg: LaunchConfig, *, nodes: int, heterogeneous: bool = False, srun_args: list[str] = (),
                   main: bool = False):
    """One Slurm resource request in the megatron-nft container: `nodes` nodes of job.gpus_per_node GPUs.

    srun starts one task per node and the task starts its own processes: the trainer's script runs
    torchrun (so that it can wait for servers and resume first), an SGLang server spawns its workers.
    The main (trainer) request carries the job-wide settings: the time-limit warning and the requeues.
    """
    import nemo_run as run

    c, job = cfg.cluster, cfg.job
    return run.SlurmExecutor(
        account=c.account,
        partition=c.partition,
        qos=c.qos,
        time=job.time,
        nodes=nodes,
        ntasks_per_node=1,
        gpus_per_node=job.gpus_per_node,
        exclusive=c.exclusive or None,
        container_image=c.container_image,
        container_mounts=list(c.container_mounts),
        # secrets by name: pyxis copies these from the job's environment (sbatch's) into the container
        container_env=list(c.secret_env) or None,
        env_vars=cluster_env(cfg),
        srun_args=[*srun_args, *([] if c.mount_home else ["--no-container-mount-home"])],
        # Slurm signals every job step (not the batch shell) this long before the time limit
        signal=f"{STOP_SIGNAL}@{cfg.signal_lead_s}" if main else None,
        retries=cfg.requeues,
        # The job runs the committed tree (git archive HEAD), never uncommitted edits.
        packager=run.GitArchivePackager(),
        tunnel=tunnel(cfg),
        heterogeneous=heterogeneous,
        wait_time_for_group_job=HET_GROUP_START_GAP_S if heterogeneous or job.rollout_nodes else 30,
    )
