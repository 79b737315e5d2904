"""Typed launch settings: the cluster (site-specific, from a YAML file) and the job (from a named recipe).

Both are filled by the training config's own loader (megatron_nft.config.merge_layers): dataclass
defaults <- YAML <- dotted overrides (`cluster.account=abc`, `job.trainer_nodes=8`), type-checked by
OmegaConf; a bad key or value stops the launch with one line naming it, before anything is generated
or submitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_nft.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent  # job.train_recipe is a path in this repository
EXECUTORS = ("local", "slurm")
COMMANDS = ("train", "demo")
# heterogeneous: one Slurm het group for the trainers and one per SGLang node; single: one allocation of
# trainer + rollout nodes, the first rollout_nodes serve (schedulers that backfill het jobs poorly)
ALLOCATIONS = ("heterogeneous", "single")
# cluster.env names that hold credentials: their values would be written into the sbatch script (and
# echoed by its `set -x`); such variables are passed by name (cluster.secret_env) instead
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


@dataclass
class ClusterConfig:
    """Where and as whom jobs run. Paths are as seen inside the container."""

    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    container_image: str | None = None  # a pyxis/enroot image: registry path or .sqsh file
    container_mounts: list[str] = field(default_factory=list)  # "host:container" pairs
    models_dir: str = "/models"  # Hugging Face checkpoints (job.hf_model is a directory in here)
    runs_dir: str = "/runs"  # run directories (metrics, checkpoints, final HF export)
    host: str | None = None  # submit over SSH to this login node; None: sbatch on this machine
    user: str | None = None
    remote_job_dir: str | None = None  # NeMo-Run's job directory on the cluster (needed with host)
    exclusive: bool = True
    retries: int = 0  # Slurm requeues after a failure; the trainer then resumes its run directory
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every task (no secrets)
    # names of variables taken from the submitting environment (sbatch's) into the containers, never
    # written anywhere: e.g. [WANDB_API_KEY, HF_TOKEN]
    secret_env: list[str] = field(default_factory=list)
    network_interface: str | None = None  # NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (e.g. ib0, eth0)
    local_cache_dir: str = "/tmp"  # node-local disk: Triton, Inductor and FlashInfer caches per job
    mount_home: bool = False  # pyxis mounts $HOME into containers by default; the image needs nothing there
    experiments_dir: str | None = None  # local NeMo-Run metadata (default: $NEMORUN_HOME or ~/.nemo_run)


@dataclass
class JobConfig:
    """What runs where: a megatron-nft command and its recipe, nodes, GPUs, rollout servers."""

    name: str = "megatron-nft"  # NeMo-Run experiment title
    description: str = ""
    command: str = "train"  # `megatron-nft train` or `megatron-nft demo`
    train_recipe: str | None = None  # training recipe (YAML), a path in this repository
    train_overrides: list[str] = field(default_factory=list)  # section.key=value for the trainer
    hf_model: str | None = None  # directory under cluster.models_dir; sets model.hf_path
    executor: str = "local"
    trainer_nodes: int = 1
    gpus_per_node: int = 8  # processes per node (torchrun --nproc-per-node); CPU ranks locally
    rollout_nodes: int = 0  # > 0: a heterogeneous Slurm job with one SGLang server per node
    # SGLang --tp-size (--dp-size fills the node): the trainer's rollout.server_tp_size, one value under
    # two names; None takes the training recipe's or a trainer override's, else 1 (settle_rollout_tp)
    rollout_tp: int | None = None
    rollout_port: int = 30000
    rollout_mem_fraction: float = 0.85  # SGLang --mem-fraction-static
    rollout_deterministic: bool = True  # SGLang --enable-deterministic-inference (sampling seeds honoured)
    rollout_seed: int = 1234  # SGLang --random-seed
    rollout_concurrency: int = 64  # requests in flight per SGLang replica: rollout.max_concurrency = this x dp
    server_args: list[str] = field(default_factory=list)  # extra SGLang flags, e.g. ["--max-running-requests", "256"]
    server_restarts: int = 3  # a server that exits is restarted in place this many times, then given up (the job goes on)
    server_gpus: int = 0  # > 0: one node, the trainer starts SGLang servers on the last server_gpus GPUs
    allocation: str = "heterogeneous"  # with rollout_nodes: heterogeneous or single (see ALLOCATIONS)
    rendezvous_port: int = 29500
    server_timeout_s: int = 3600  # how long trainers wait for the SGLang servers to answer
    time: str = "04:00:00"
    # time limits: the trainers get SIGUSR1 this long before the limit (a planned step, a checkpoint,
    # the batch script's shutdown) and stop after their step with a checkpoint; Slurm requeues the job
    step_minutes: float = 10.0  # planned step time (`megatron-nft plan`)
    save_minutes: float = 5.0  # time to write a checkpoint
    save_every_minutes: float = 60.0  # the trainer's run.save_every_minutes on Slurm (node failures)
    requeues: int | None = None  # how often Slurm requeues the job (time limit or failure); None: cluster.retries


@dataclass
class LaunchConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    job: JobConfig = field(default_factory=JobConfig)

    @property
    def run_dir(self) -> str:
        """The trainer's run.dir: an explicit override wins, else <runs_dir>/<job name>-<point>, one
        directory per launched training configuration (sweep points from one recipe never share one)."""
        for item in reversed(self.job.train_overrides):
            if item.startswith("run.dir="):
                return item.split("=", 1)[1]
        return f"{self.cluster.runs_dir.rstrip('/')}/{self.job.name}-{self.point}"

    @property
    def point(self) -> str:
        """8 hex digits naming what is trained: recipe, model, overrides and layout. run.* overrides
        other than run.seed are left out: resuming, saving more often or longer runs continue a run."""
        import hashlib
        import json

        job = self.job
        overrides = [o for o in job.train_overrides if not o.startswith("run.") or o.startswith("run.seed=")]
        key = [job.command, job.train_recipe, job.hf_model, job.trainer_nodes, job.gpus_per_node, job.rollout_nodes,
               job.rollout_tp, job.server_gpus, overrides]
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:8]

    @property
    def requeues(self) -> int:
        return self.cluster.retries if self.job.requeues is None else self.job.requeues

    @property
    def signal_lead_s(self) -> int:
        """Seconds before the time limit at which the trainers are told to stop: one planned step, one
        checkpoint, and the batch script's two 60 s polls before it requeues (NeMo-Run's monitor)."""
        job = self.job
        return int((job.step_minutes + job.save_minutes) * 60) + 180


def load_launch_config(recipe: dict, cluster_file: str | Path | None = None, overrides: list[str] = (),
                       train_overrides: list[str] = ()) -> LaunchConfig:
    """Defaults <- the named recipe's job fields <- the cluster YAML <- `cluster.*` / `job.*` overrides;
    `train_overrides` (the trainer's section.key=value) follow the job's own train_overrides."""
    from omegaconf import OmegaConf

    from megatron_nft.config import merge_layers, override_layer, read_yaml

    layers = [("recipe", OmegaConf.create({"job": recipe}))]
    if cluster_file is not None:
        path = Path(cluster_file)
        layers.append((f"--cluster {path}", OmegaConf.create({"cluster": read_yaml(path, f"--cluster {path}")})))
    for item in overrides:
        if item.split(".", 1)[0] not in ("cluster", "job"):
            raise ConfigError(f"override {item!r}: expected cluster.key=value or job.key=value")
        layers.append(override_layer(item, "cluster.key=value or job.key=value"))
    cfg: LaunchConfig = merge_layers(LaunchConfig, layers)
    cfg.job.train_overrides = [*cfg.job.train_overrides, *train_overrides]
    settle_rollout_tp(cfg)
    validate(cfg)
    return cfg


def settle_rollout_tp(cfg: LaunchConfig) -> None:
    """job.rollout_tp and the trainer's rollout.server_tp_size name one value, the TP of the SGLang
    servers the launch starts: unset, it is what the training recipe or a trainer override states (else
    1); set, it must agree with what they state. A contradiction is one line."""
    from megatron_nft.config import stated_value

    job = cfg.job
    recipe = None
    if job.train_recipe is not None:
        recipe = Path(job.train_recipe) if Path(job.train_recipe).is_absolute() else REPO / job.train_recipe
    stated = stated_value(recipe, job.train_overrides, "rollout.server_tp_size")
    if not isinstance(stated, int) or isinstance(stated, bool):
        stated = None  # not stated, or not a number: the trainer's loader names a bad value
    if job.rollout_tp is None:
        job.rollout_tp = 1 if stated is None else stated
    elif stated is not None and stated != job.rollout_tp:
        raise ConfigError(f"job.rollout_tp={job.rollout_tp} but rollout.server_tp_size={stated} (training recipe "
                          f"{job.train_recipe} or a trainer override): both are the SGLang servers' TP; give one value")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: LaunchConfig) -> None:
    job, cluster = cfg.job, cfg.cluster
    _require(job.executor in EXECUTORS, f"job.executor={job.executor!r}: allowed values are {', '.join(EXECUTORS)}")
    _require(job.command in COMMANDS, f"job.command={job.command!r}: allowed values are {', '.join(COMMANDS)}")
    _require(job.trainer_nodes >= 1, f"job.trainer_nodes={job.trainer_nodes}: must be >= 1")
    _require(job.gpus_per_node >= 1, f"job.gpus_per_node={job.gpus_per_node}: must be >= 1")
    _require(job.rollout_nodes >= 0, f"job.rollout_nodes={job.rollout_nodes}: must be >= 0")
    launches_servers = job.rollout_nodes or job.server_gpus
    _require(job.rollout_tp >= 1 and (not launches_servers or job.gpus_per_node % job.rollout_tp == 0),
             f"job.rollout_tp={job.rollout_tp}: must divide job.gpus_per_node={job.gpus_per_node}")
    _require(0 < job.rollout_mem_fraction < 1, f"job.rollout_mem_fraction={job.rollout_mem_fraction}: must be in (0, 1)")
    _require(job.command == "demo" or job.train_recipe is not None,
             "job.train_recipe is not set: `train` needs a training recipe (job.train_recipe=recipes/....yaml)")
    _require(cluster.retries >= 0, f"cluster.retries={cluster.retries}: must be >= 0")
    _require(job.requeues is None or job.requeues >= 0, f"job.requeues={job.requeues}: must be >= 0 or null")
    _require(job.allocation in ALLOCATIONS, f"job.allocation={job.allocation!r}: allowed values are {', '.join(ALLOCATIONS)}")
    _require(job.server_restarts >= 0, f"job.server_restarts={job.server_restarts}: must be >= 0")
    _require(job.rollout_concurrency >= 1, f"job.rollout_concurrency={job.rollout_concurrency}: must be >= 1")
    for key in ("step_minutes", "save_minutes", "save_every_minutes"):
        _require(getattr(job, key) >= 0, f"job.{key}={getattr(job, key)}: must be >= 0")
    _require(0 <= job.server_gpus < job.gpus_per_node and job.server_gpus % job.rollout_tp == 0,
             f"job.server_gpus={job.server_gpus}: must be a multiple of job.rollout_tp={job.rollout_tp} below "
             f"job.gpus_per_node={job.gpus_per_node} (the trainer keeps the others)")
    _require(not job.server_gpus or job.trainer_nodes == 1,
             f"job.server_gpus={job.server_gpus} needs job.trainer_nodes=1 (the trainer starts its servers on its own node)")
    _require(not (job.server_gpus and job.rollout_nodes),
             "job.server_gpus and job.rollout_nodes exclude each other: servers share the trainers' node, or have their own")
    for name in cluster.env:
        _require(not any(word in name.upper() for word in SECRET_WORDS),
                 f"cluster.env.{name}: a credential's value would be written into the job script; "
                 f"list its name in cluster.secret_env and export it where you submit")
    for name in cluster.secret_env:
        _require(name.isidentifier(), f"cluster.secret_env entry {name!r}: expected an environment variable name")
    if job.executor == "local":
        _require(job.trainer_nodes == 1, f"job.trainer_nodes={job.trainer_nodes}: the local executor runs one node")
        _require(job.rollout_nodes == 0, "job.rollout_nodes > 0 needs job.executor=slurm (SGLang servers on their own nodes)")
    else:
        _require(cluster.account is not None, "cluster.account is not set: Slurm jobs need an account (--cluster FILE or cluster.account=NAME)")
        _require(cluster.container_image is not None,
                 "cluster.container_image is not set: Slurm jobs run in the megatron-nft image (see Dockerfile)")
        _require(cluster.host is None or cluster.remote_job_dir is not None,
                 "cluster.host is set but cluster.remote_job_dir is not: NeMo-Run needs a job directory on the cluster")
        for mount in cluster.container_mounts:
            _require(":" in mount, f"cluster.container_mounts entry {mount!r}: expected host_path:container_path")
        limit = _time_limit_s(job.time)
        _require(limit > cfg.signal_lead_s,
                 f"job.time={job.time}: shorter than the stop warning of {cfg.signal_lead_s} s it needs "
                 f"(job.step_minutes={job.step_minutes} + job.save_minutes={job.save_minutes} + 3 min)")


def _time_limit_s(value: str) -> int:
    """Slurm's [days-]hours:minutes:seconds (or minutes, minutes:seconds) in seconds."""
    days, _, clock = value.rpartition("-")
    try:
        parts = [int(p) for p in clock.split(":")]
        whole_days = int(days) if days else 0
    except ValueError:
        raise ConfigError(f"job.time={value!r}: expected [days-]hours:minutes:seconds") from None
    if days:
        parts += [0] * (3 - len(parts))
        h, m, s = parts[:3]
    elif len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = 0, parts[0], 0
    return ((whole_days * 24 + h) * 60 + m) * 60 + s
