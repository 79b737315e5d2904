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
# What Slurm sends every job step ahead of the time limit (#SBATCH --signal): not SIGTERM, which
# torchrun and SGLang take as "shut down now"; the trainer script ignores it for everything it starts
# and forwards a SIGTERM to the training processes only.
STOP_SIGNAL = "USR1"
# Seconds between a rollout server's exit and its restart (its GPUs' memory is released meanwhile).
SERVER_RESTART_DELAY_S = 10
# megatron_nft.cli.EXIT_STOPPED: stopped by SIGTERM after a checkpoint (the job should continue)
EXIT_STOPPED = 75


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
        args += [f"run.dir={cfg.run_dir}", f"run.save_every_minutes={job.save_every_minutes:g}"]
    if job.rollout_nodes:
        # what the trainer must know of the servers it feeds: ranks per server (the broadcast group's
        # size, the tensor payloads per server), replicas (tensor and broadcast weight updates need
        # --dp-size 1; config validation refuses them otherwise) and how many requests keep them busy
        args += ["rollout.engine=sglang", f"rollout.server_tp_size={job.rollout_tp}",
                 f"rollout.server_dp_size={rollout_dp(cfg)}",
                 f"rollout.max_concurrency={job.rollout_concurrency * rollout_dp(cfg)}"]
    elif job.server_gpus:
        # one node: the trainer starts its servers on the node's last GPUs, its ranks keep the first
        gpus = list(range(job.gpus_per_node - job.server_gpus, job.gpus_per_node))
        args += ["rollout.engine=sglang", f"rollout.num_servers={job.server_gpus // job.rollout_tp}",
                 f"rollout.server_tp_size={job.rollout_tp}", "rollout.server_dp_size=1",
                 f"rollout.server_gpus=[{','.join(map(str, gpus))}]", f"rollout.max_concurrency={job.rollout_concurrency}",
                 f"rollout.server_mem_fraction={job.rollout_mem_fraction:g}",
                 f"rollout.server_args=[{','.join(server_flags(cfg))}]"]
        if job.executor == "slurm":
            args.append(f"rollout.sglang_python={SGLANG_PYTHON}")
    return args + list(job.train_overrides)


def server_flags(cfg: LaunchConfig) -> list[str]:
    """SGLang flags beyond the layout: its sampling seed and the user's extra flags."""
    return ["--random-seed", str(cfg.job.rollout_seed), *cfg.job.server_args]


def trainer_processes(cfg: LaunchConfig) -> int:
    """torchrun processes per trainer node: the node's GPUs less those lent to SGLang servers."""
    return cfg.job.gpus_per_node - cfg.job.server_gpus


def rollout_dp(cfg: LaunchConfig) -> int:
    """SGLang --dp-size of each rollout server: data-parallel replicas filling its node."""
    return cfg.job.gpus_per_node // cfg.job.rollout_tp


def local_trainer(cfg: LaunchConfig):
    """`torchrun -m megatron_nft.cli ...` through LocalExecutor(launcher="torchrun")."""
    import nemo_run as run

    return run.Script(path="megatron_nft.cli", m=True, entrypoint="python", args=trainer_arguments(cfg))


def rollout_urls(cfg: LaunchConfig, first_group: int = 1) -> str:
    """Comma-separated server URLs: from the het-group host macros (rollout groups follow the trainer's),
    or, in a single allocation, the first rollout_nodes hosts of the node list."""
    from nemo_run.core.execution.base import ExecutorMacros

    job = cfg.job
    if job.allocation == "single":
        hosts = [f"${{nodes[{i}]}}" for i in range(job.rollout_nodes)]
    else:
        hosts = [ExecutorMacros.group_host(first_group + i) for i in range(job.rollout_nodes)]
    return ",".join(f"http://{host}:{job.rollout_port}" for host in hosts)


def trainer_host(cfg: LaunchConfig, *, heterogeneous: bool) -> str:
    """Where torchrun rendezvouses: the trainer group's first node (het), the first node after the
    servers (single allocation) or the allocation's head node."""
    from nemo_run.core.execution.base import ExecutorMacros

    if heterogeneous:
        return ExecutorMacros.group_host(0)
    if cfg.job.rollout_nodes:
        return f"${{nodes[{cfg.job.rollout_nodes}]}}"
    return "$$" + ExecutorMacros.HEAD_NODE_IP_VAR


def slurm_trainer(cfg: LaunchConfig, *, heterogeneous: bool):
    """One task per trainer node; it starts torchrun with trainer_processes(cfg) processes."""
    import nemo_run as run

    job = cfg.job
    env = {"NFT_TRAINER_HOST": trainer_host(cfg, heterogeneous=heterogeneous)}
    lines = [
        "set -euo pipefail",
        "# Runs once per trainer node (srun, one task per node) and starts torchrun there.",
        f"# Slurm's warning of the time limit ({STOP_SIGNAL}) reaches every process of the step. The commands",
        "# below run with it ignored (inherited); this shell remembers it and passes it on as `forward` says:",
        "# the training processes get the SIGTERM they stop on (torchrun itself would kill them 30 s later).",
        "stop=0; child=0; forward=:",
        'on_stop() { stop=1; if [ "$child" != 0 ]; then eval "$forward"; fi; }',
        f"trap on_stop {STOP_SIGNAL}",
        "run_child() {  # \"$@\" in the background, waited for through traps; its status in $code",
        f'  trap \'\' {STOP_SIGNAL}; "$@" & child=$!; trap on_stop {STOP_SIGNAL}',
        '  while :; do wait "$child"; code=$?; kill -0 "$child" 2>/dev/null || break; done',
        "  child=0",
        "}",
        "set +e",
    ]
    if job.rollout_nodes:
        env["NFT_ROLLOUT_URLS"] = rollout_urls(cfg)
        lines += [
            "forward='kill -TERM \"$child\"'",
            f'run_child python -m launch.wait_for_servers "$NFT_ROLLOUT_URLS" --timeout {job.server_timeout_s}',
            'if [ "$stop" = 0 ] && [ "$code" -ne 0 ]; then exit "$code"; fi',
        ]
    args = " ".join(shlex.quote(a) for a in trainer_arguments(cfg))
    if job.rollout_nodes:
        args += ' "rollout.urls=[$NFT_ROLLOUT_URLS]"'
    config_file = shlex.quote(f"{cfg.run_dir}/config.yaml")
    checkpoints = shlex.quote(f"{cfg.run_dir}/checkpoints")
    has_checkpoint = f'[ -n "$(ls -d {checkpoints}/step_[0-9]* 2>/dev/null)" ]'
    lines += [
        f'if [ "$stop" = 1 ]; then echo "trainer: the time limit is near before training began" >&2; exit {EXIT_STOPPED}; fi',
        f"set -- {args}",
        "# a job that Slurm requeued (time limit, failure) continues its run directory from its newest checkpoint;",
        "# one that failed before its first checkpoint starts that run again (resume would refuse: nothing to resume)",
        f'if [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ] && {has_checkpoint}; '
        f'then set -- "$@" run.resume=true; '
        f'elif [ "${{SLURM_RESTART_COUNT:-0}}" -gt 0 ] && [ -e {config_file} ]; then set -- "$@" run.overwrite=true; fi',
        "forward='pkill -TERM -P \"$child\"'  # torchrun's children: the training processes",
        f"run_child torchrun --nnodes={job.trainer_nodes} --nproc-per-node={trainer_processes(cfg)} --tee=3 "
        f'--rdzv-backend=c10d --rdzv-endpoint="$NFT_TRAINER_HOST:{job.rendezvous_port}" --rdzv-id="$SLURM_JOB_ID" '
        '-m megatron_nft.cli "$@"',
        f"# stopped after a step with a checkpoint: {EXIT_STOPPED}, which the batch script answers with a requeue",
        f'if [ "$stop" = 1 ] && [ "$code" -ne 0 ] && {has_checkpoint}; then exit {EXIT_STOPPED}; fi',
        'exit "$code"',
    ]
    return run.Script(inline="\n".join(lines) + "\n", env=env)


def sglang_command(cfg: LaunchConfig) -> list[str]:
    """One SGLang server filling a node: TP rollout_tp, data-parallel replicas for the rest."""
    job = cfg.job
    model = f"{cfg.cluster.models_dir.rstrip('/')}/{job.hf_model}" if job.hf_model else None
    return [
        SGLANG_PYTHON, "-m", "sglang.launch_server",
        *(["--model-path", model] if model else []),
        "--host", "0.0.0.0",
        "--port", str(job.rollout_port),
        "--tp-size", str(job.rollout_tp),
        "--dp-size", str(rollout_dp(cfg)),
        "--mem-fraction-static", str(job.rollout_mem_fraction),
        # SGLang uses the trainer's per-request sampling seeds only in this mode: resumes re-draw
        *([DETERMINISTIC_FLAG] if job.rollout_deterministic else []),
        *server_flags(cfg),
    ]


def sglang_server(cfg: LaunchConfig):
    """The server under launch.supervise, which is its srun's process: a server that exits (a GPU
    fault, an out-of-memory) is started again in place, job.server_restarts times; after that the
    supervisor answers 503 on the server's port and stays, because NeMo-Run's batch script ends the
    whole job a minute after any srun exits. The trainers' client drops a server that stops
    answering and re-sends its prompts to the others."""
    import nemo_run as run

    job = cfg.job
    command = " ".join(shlex.quote(a) for a in sglang_command(cfg))
    lines = [
        "set -euo pipefail",
        "# The time-limit warning is the trainers'; servers serve until the job ends. Ignored here, it stays",
        "# ignored in the supervisor and the server (before the supervisor could ignore it itself).",
        f"trap '' {STOP_SIGNAL}",
        (f"exec python -m launch.supervise --restarts {job.server_restarts} --delay {SERVER_RESTART_DELAY_S} "
         f"--port {job.rollout_port} -- {command}"),
    ]
    return run.Script(inline="\n".join(lines) + "\n")
