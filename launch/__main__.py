"""`python -m launch`: run a named recipe locally or on Slurm through NeMo-Run, or print what would run.

    python -m launch --list
    python -m launch local/demo --dryrun
    python -m launch paper/qwen2.5-32b-nft --cluster cluster.yaml job.trainer_nodes=16 algo.eps=0.5 --dryrun

Overrides: `cluster.key=value` and `job.key=value` change the launch (launch/config.py); any other
`section.key=value` is passed to the trainer, after megatron-nft's own config loader has checked it
with the training recipe (skip with --no-validate on a machine without torch).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from megatron_nft.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parent.parent


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the flag (the usage block would bury it) and exit
    status 2, as megatron-nft's own CLI answers bad input."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from launch.recipes import RECIPES

    p = _Parser(
        prog="python -m launch",
        description="Launch megatron-nft with NeMo-Run: locally under torchrun, or on Slurm in the container, "
        "with SGLang rollout nodes for the paper's runs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="recipes:\n" + "\n".join(f"  {name:<36} {r['description']}" for name, r in RECIPES.items() if "-256gpu" not in name)
        + "\n  paper/qwen2.5-32b-<algo>-256gpu      the 32B runs on 16 + 16 nodes\n\n"
        "overrides: cluster.KEY=VALUE and job.KEY=VALUE set the launch (see launch/config.py);\n"
        "any other section.key=value goes to the trainer (megatron-nft overrides).\n\n"
        "examples:\n"
        "  python -m launch local/demo --dryrun\n"
        "  python -m launch local/train job.train_recipe=my.yaml job.gpus_per_node=8\n"
        "  python -m launch paper/qwen2.5-math-7b-nft --cluster cluster.yaml --dryrun\n"
        "  python -m launch paper/qwen2.5-32b-nft --cluster cluster.yaml job.trainer_nodes=16 algo.eps=0.5",
    )
    p.add_argument("recipe", nargs="?", metavar="RECIPE", help="a named launch recipe (--list shows them)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="cluster.*, job.* or trainer overrides")
    p.add_argument("--list", action="store_true", help="list the named recipes and exit")
    p.add_argument("--cluster", metavar="FILE", help="YAML with cluster settings (account, partition, container_image, ...)")
    p.add_argument("--dryrun", action="store_true", help="print the generated sbatch / torchrun commands; submit nothing")
    p.add_argument("--no-validate", action="store_true", help="do not check the trainer config before launching")
    p.add_argument("--wait", action="store_true", help="Slurm: stay attached and tail the logs (local runs always wait)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="launch one job per value (repeat for a grid: one job per combination), each in its own "
                   "run directory; KEY is any override (job.*, trainer keys)")
    return p


def sweep_points(sweeps: list[str]) -> list[list[str]]:
    """The grid of --sweep KEY=V1,V2 options as override lists (commas inside [...] belong to a value)."""
    import itertools
    import re

    axes = []
    for item in sweeps:
        key, sep, values = item.partition("=")
        if not sep or not key or key.startswith("cluster."):
            raise ConfigError(f"--sweep {item!r}: expected KEY=V1,V2,... with a job.* or trainer key")
        split = [v.strip() for v in re.split(r",(?![^\[]*\])", values)]
        if not all(split):
            raise ConfigError(f"--sweep {item!r}: an empty value")
        axes.append([f"{key}={v}" for v in split])
    return [list(point) for point in itertools.product(*axes)]


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(launch overrides, trainer overrides) by their first dotted component."""
    launch = [o for o in overrides if o.split(".", 1)[0] in ("cluster", "job")]
    return launch, [o for o in overrides if o not in launch]


def resolve(recipe_name: str, cluster_file: str | None, overrides: list[str]):
    from launch.config import load_launch_config
    from launch.recipes import recipe

    launch_overrides, train_overrides = split_overrides(overrides)
    cfg = load_launch_config(recipe(recipe_name), cluster_file, launch_overrides, train_overrides)
    if cfg.job.executor == "local" and cfg.job.train_recipe and not Path(cfg.job.train_recipe).is_absolute():
        # torchrun runs in the caller's directory; the recipe path is the repository's
        cfg.job.train_recipe = str(REPO / cfg.job.train_recipe)
    return cfg


def validate_trainer(cfg) -> None:
    """The trainer's recipe + overrides through megatron-nft's loader, and the GPU count against the
    parallel layout: a typo fails here, not after hours in the queue."""
    from megatron_nft.config import load_config

    from launch.tasks import trainer_arguments, trainer_processes

    job = cfg.job
    recipe = job.train_recipe or str(REPO / "recipes" / "demo.yaml")
    path = Path(recipe) if Path(recipe).is_absolute() else REPO / recipe
    overrides = [a for a in trainer_arguments(cfg) if "=" in a and not a.startswith("-")]
    if job.rollout_nodes:
        overrides.append("rollout.urls=[http://rollout-node:30000]")  # the real hosts are known at run time
    train = load_config(path, overrides)
    ranks = job.trainer_nodes * trainer_processes(cfg)
    what = "job.trainer_nodes x (job.gpus_per_node - job.server_gpus)" if job.server_gpus else "job.trainer_nodes x job.gpus_per_node"
    train.parallel.check_world(ranks, f"{what} = {ranks} processes", f" ({recipe})")
    if job.executor == "slurm":
        wandb_offline = cfg.cluster.env.get("WANDB_MODE") in ("offline", "disabled")
        if train.run.wandb_project and not wandb_offline and "WANDB_API_KEY" not in cfg.cluster.secret_env:
            raise ConfigError(f"run.wandb_project={train.run.wandb_project}: W&B needs its key on the nodes: "
                              f"cluster.secret_env=[WANDB_API_KEY] (exported where you submit), or cluster.env.WANDB_MODE=offline")
        _warn_if_uncommitted(path)


def check_secrets(cfg) -> None:
    """Secrets travel by name from the environment sbatch runs in: when that is this machine's, each
    must be set here (over SSH it is the login shell's, which only the job can see)."""
    import os

    if cfg.job.executor != "slurm" or cfg.cluster.host:
        return
    missing = [name for name in cfg.cluster.secret_env if name not in os.environ]
    if missing:
        raise ConfigError(f"cluster.secret_env: {', '.join(missing)} not set in this environment "
                          f"(the job takes them from sbatch's environment by name)")


def _warn_if_uncommitted(path: Path) -> None:
    """Slurm jobs run `git archive HEAD`: an uncommitted recipe is not what runs."""
    rel = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else None
    if rel is None:
        return
    status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", rel], capture_output=True, text=True)
    if status.returncode == 0 and status.stdout.strip():
        print(f"launch: warning: {rel} is not committed as it is: the job runs the committed tree (git archive HEAD)",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # options may come between the recipe and overrides
    try:
        if args.list:
            from launch.recipes import RECIPES

            for name, r in RECIPES.items():
                print(f"{name:<36} {r['description']}")
            return 0
        if not args.recipe:
            raise ConfigError("no recipe given: python -m launch RECIPE (see --list)")
        # every point is checked before the first is submitted: a bad value fails the sweep, not job 3
        configs = [resolve(args.recipe, args.cluster, args.overrides + point) for point in sweep_points(args.sweep)]
        if len({cfg.run_dir for cfg in configs}) < len(configs):
            raise ConfigError("--sweep: two points share a run directory (a run.dir override, or repeated values)")
        for cfg in configs:
            if not args.no_validate:
                validate_trainer(cfg)
            if not args.dryrun:
                check_secrets(cfg)
        from launch import experiment

        if args.dryrun:
            print("\n\n".join(experiment.dryrun(cfg) for cfg in configs))
            return 0
        code = 0
        for cfg in configs:
            detach = cfg.job.executor == "slurm" and not args.wait
            exp_id, state = experiment.submit(cfg, detach=detach)
            print(f"experiment {exp_id}: {state}; follow it with `nemo experiment status {exp_id}` and "
                  f"`nemo experiment logs {exp_id} 0`")
            if cfg.job.executor == "slurm":
                print(f"run directory (in the container): {cfg.run_dir}")
            code = code or (0 if detach or state == "SUCCEEDED" else 1)
        return code
    except UserError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
