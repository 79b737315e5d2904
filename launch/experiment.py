"""A launch as one NeMo-Run Experiment: build the tasks and executors, then dry-run or submit.

local   one task: torchrun -m megatron_nft.cli ... (LocalExecutor, launcher="torchrun")
slurm   one task: the trainer script on job.trainer_nodes nodes (SlurmExecutor)
het     job.rollout_nodes > 0: a heterogeneous Slurm job, group 0 the trainers, groups 1..R one SGLang
        server node each. NeMo-Run's het-group host macro names the first node of a group, so every
        rollout node is its own group and every server URL comes from a macro.
"""

from __future__ import annotations

import os

from launch.config import LaunchConfig
from launch.executors import local_executor, slurm_executor
from launch.tasks import local_trainer, sglang_server, slurm_trainer


def build(cfg: LaunchConfig) -> tuple[list, list]:
    """(tasks, executors), one executor per task; index 0 is the trainer."""
    job = cfg.job
    if job.executor == "local":
        return [local_trainer(cfg)], [local_executor(cfg)]
    # --label: each line of the trainers' shared log names its node (torchrun's --tee names the rank)
    if job.rollout_nodes and job.allocation == "single":
        # one allocation of rollout + trainer nodes: each srun takes its nodes by position in the list
        servers, trainers = job.rollout_nodes, job.trainer_nodes
        tasks = [slurm_trainer(cfg, heterogeneous=False)]
        executors = [slurm_executor(cfg, nodes=servers + trainers, main=True, srun_args=[
            f"--nodes={trainers}", f"--ntasks={trainers}", f"--relative={servers}", "--label"])]
        for i in range(servers):
            tasks.append(sglang_server(cfg))
            executors.append(slurm_executor(cfg, nodes=1, srun_args=["--nodes=1", "--ntasks=1", f"--relative={i}"]))
        return tasks, executors
    het = job.rollout_nodes > 0
    tasks = [slurm_trainer(cfg, heterogeneous=het)]
    executors = [slurm_executor(cfg, nodes=job.trainer_nodes, heterogeneous=het, main=True, srun_args=["--label"])]
    for _ in range(job.rollout_nodes):
        tasks.append(sglang_server(cfg))
        executors.append(slurm_executor(cfg, nodes=1, heterogeneous=True))
    return tasks, executors


def _experiment(cfg: LaunchConfig, *, quiet: bool = False):
    import nemo_run as run

    base = cfg.cluster.experiments_dir
    return run.Experiment(cfg.job.name, base_dir=os.path.expanduser(base) if base else None, clean_mode=True,
                          log_level="WARN" if quiet else "INFO")


def _add(exp, cfg: LaunchConfig) -> list:
    """Adds the launch to the experiment (a task group when there are rollout servers); returns the tasks."""
    tasks, executors = build(cfg)
    if len(tasks) == 1:
        exp.add(tasks[0], executor=executors[0], name=cfg.job.name)
    else:
        exp.add(tasks, executor=executors, name=cfg.job.name)
    return tasks


def dryrun(cfg: LaunchConfig) -> str:
    """What would be submitted, as text: the sbatch script (Slurm) or the torchrun command (local),
    and the trainer script that srun starts on each trainer node. Nothing is submitted."""
    with _experiment(cfg, quiet=True) as exp:
        tasks = _add(exp, cfg)
        exp.dryrun(log=False)
        infos = _dryrun_infos(exp)
    parts = [_describe(cfg), f"# run directory: {cfg.run_dir}"]
    for info in infos:
        parts.append(_local_command(info.request, cfg) if cfg.job.executor == "local" else repr(info.request))
    trainer = tasks[0]
    if getattr(trainer, "inline", ""):
        script = f"{cfg.job.name}-0.sh" if len(tasks) > 1 else f"{cfg.job.name}.sh"  # NeMo-Run's naming
        parts.append(f"#----------------\n# trainer script (scripts/{script}, once per trainer node)\n"
                     f"#----------------\n{trainer.inline}")
    if len(tasks) > 1:
        parts.append(f"#----------------\n# server script (scripts/{cfg.job.name}-1.sh .. -{len(tasks) - 1}.sh, "
                     f"one per rollout node)\n#----------------\n{tasks[1].inline}")
    return "\n\n".join(parts)


def submit(cfg: LaunchConfig, *, detach: bool) -> tuple[str, str]:
    """Submits (Slurm) or runs (local) the experiment: (experiment id for `nemo experiment ...`, state).
    Without `detach` it returns when the job has ended (the experiment's exit waits for it)."""
    with _experiment(cfg) as exp:
        _add(exp, cfg)
        exp.run(detach=detach, tail_logs=not detach)
    return exp._id, str(exp.jobs[0].state)  # NeMo-Run 0.11 has no public accessor for the id


def _dryrun_infos(exp) -> list:
    # NeMo-Run 0.11 keeps each job's torchx AppDryRunInfo on the job (Job._dryrun_info, or one per
    # task on JobGroup._dryrun_infos); its `request` is what the scheduler would submit.
    infos = []
    for job in exp.jobs:
        infos += getattr(job, "_dryrun_infos", None) or [job._dryrun_info]
    return infos


def _local_command(request, cfg: LaunchConfig) -> str:
    """A torchx local PopenRequest as the shell command it runs (with the environment the launch sets;
    torchx adds its own bookkeeping variables)."""
    import shlex

    from launch.executors import BASE_ENV

    ours = {**BASE_ENV, **cfg.cluster.env}
    lines = []
    for replicas in request.role_params.values():
        for replica in replicas:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(replica.env.items()) if k in ours)
            cwd = f"cd {shlex.quote(replica.cwd)} && " if replica.cwd else ""
            lines.append(f"{cwd}{'env ' + env + ' ' if env else ''}{' '.join(replica.args)}")
    return "\n".join(lines)


def _describe(cfg: LaunchConfig) -> str:
    job = cfg.job
    what = f"{job.trainer_nodes} trainer node(s) x {job.gpus_per_node} processes"
    if job.rollout_nodes:
        what += f" + {job.rollout_nodes} SGLang node(s) (TP{job.rollout_tp} x DP{job.gpus_per_node // job.rollout_tp})"
        if job.allocation == "single":
            what += " in one allocation"
    if job.server_gpus:
        what = (f"1 node: {job.gpus_per_node - job.server_gpus} trainer processes + {job.server_gpus // job.rollout_tp} "
                f"SGLang server(s) of TP{job.rollout_tp} on the last {job.server_gpus} GPUs")
    return f"# {job.name}: {job.description or job.command} -- {what}, executor {job.executor} (dry run: nothing submitted)"
