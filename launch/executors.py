"""NeMo-Run executors from the launch config: LocalExecutor with torchrun, SlurmExecutor (container,
mounts, nodes, GPUs per node, account/partition, GitArchivePackager), and the heterogeneous variant."""

from __future__ import annotations

import os

from launch.config import LaunchConfig

# Seconds between the srun of one heterogeneous group and the next: the trainers wait for the
# servers' health themselves (launch/wait_for_servers.py), so no long fixed sleep is needed.
HET_GROUP_START_GAP_S = 5
# Every task's environment: offline Hugging Face libraries (compute nodes often have no internet and
# everything is in the image or the mounts), unbuffered logs.
BASE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def local_executor(cfg: LaunchConfig):
    """torchrun with job.gpus_per_node processes on this machine."""
    import nemo_run as run

    return run.LocalExecutor(
        ntasks_per_node=cfg.job.gpus_per_node,
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


def slurm_executor(cfg: LaunchConfig, *, nodes: int, heterogeneous: bool = False):
    """One Slurm resource request in the megatron-nft container: `nodes` nodes of job.gpus_per_node GPUs.

    srun starts one task per node and the task starts its own processes: the trainer's script runs
    torchrun (so that it can wait for servers and resume first), an SGLang server spawns its workers.
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
        env_vars={**BASE_ENV, **c.env},
        retries=c.retries,
        # The job runs the committed tree (git archive HEAD), never uncommitted edits.
        packager=run.GitArchivePackager(),
        tunnel=tunnel(cfg),
        heterogeneous=heterogeneous,
        wait_time_for_group_job=HET_GROUP_START_GAP_S if heterogeneous else 30,
    )
