"""Named launch recipes: the job half of a launch (what runs, on how many nodes).

Each is a dict of JobConfig fields; `job.key=value` overrides any of them. The paper's runs
(Chen et al., NFT: 7B on 64 H100, 32B on 128-256 H100) are heterogeneous Slurm jobs: trainer nodes
run the Megatron actor under torchrun, rollout nodes run one SGLang server each. The 50/50 split is a
starting point: `megatron-nft plan` estimates the actor and rollout time of a step for a given split.
"""

from __future__ import annotations

from megatron_nft.errors import ConfigError

PAPER_ALGORITHMS = ("nft", "rft", "grpo", "dr_grpo", "dapo", "infonca")

RECIPES: dict[str, dict] = {
    "local/demo": dict(
        description="the embedded CPU demo, torchrun on this machine (job.gpus_per_node ranks, data-parallel)",
        command="demo", executor="local", gpus_per_node=2,
    ),
    "local/train": dict(
        description="one node, torchrun: `megatron-nft train` with job.train_recipe (local rollout engine)",
        command="train", executor="local", gpus_per_node=8,
    ),
    "slurm/train": dict(
        description="Slurm, container, torchrun on job.trainer_nodes nodes (local rollout engine)",
        command="train", executor="slurm", trainer_nodes=1, gpus_per_node=8, requeues=10,
    ),
    # The smallest GPU run: one 8-GPU node shared by trainer ranks (GPUs 0-3) and the SGLang servers the
    # trainer starts itself (GPUs 4-7, one per server at TP1), never on each other's GPUs.
    "local/one-node": dict(
        description="one GPU node, torchrun: 4 trainer ranks + 4 SGLang servers the trainer starts (job.train_recipe)",
        command="train", executor="local", gpus_per_node=8, server_gpus=4,
    ),
    "slurm/one-node": dict(
        description="one Slurm node in the container: 4 trainer ranks + 4 SGLang servers the trainer starts",
        command="train", executor="slurm", trainer_nodes=1, gpus_per_node=8, server_gpus=4, requeues=10,
    ),
}


def _paper(model: str, hf_model: str, algo: str, trainer_nodes: int, rollout_nodes: int, rollout_tp: int, note: str,
           step_minutes: float) -> dict:
    return dict(
        description=f"{hf_model} {algo}: {trainer_nodes} trainer + {rollout_nodes} SGLang nodes x 8 GPUs ({note})",
        command="train", executor="slurm",
        train_recipe=f"recipes/paper/{model}-{algo}.yaml",
        hf_model=hf_model,
        trainer_nodes=trainer_nodes, rollout_nodes=rollout_nodes, gpus_per_node=8, rollout_tp=rollout_tp,
        time="24:00:00",
        # the time-limit warning comes one planned step (`megatron-nft plan`'s upper figure) ahead;
        # the job continues itself through this many requeues (time limits and failures alike)
        step_minutes=step_minutes, requeues=20,
    )


for _algo in PAPER_ALGORITHMS:
    # 7B at 512 + 3584 tokens: one SGLang replica per GPU (TP1, 15 GB of bf16 weights)
    RECIPES[f"paper/qwen2.5-math-7b-{_algo}"] = _paper("qwen2.5-math-7b", "Qwen2.5-Math-7B", _algo, 4, 4, 1, "64 H100", 40)
    # 32B at 2048 + 14336 tokens: TP2 servers (33 GB of weights per GPU leaves ~35 GB of KV cache)
    RECIPES[f"paper/qwen2.5-32b-{_algo}"] = _paper("qwen2.5-32b", "Qwen2.5-32B", _algo, 8, 8, 2, "128 H100", 150)
    RECIPES[f"paper/qwen2.5-32b-{_algo}-256gpu"] = _paper("qwen2.5-32b", "Qwen2.5-32B", _algo, 16, 16, 2, "256 H100", 90)


def recipe(name: str) -> dict:
    if name not in RECIPES:
        close = [n for n in RECIPES if name.split("/")[-1] in n]
        hint = f"; did you mean {', '.join(close[:4])}?" if close else "; `python -m launch --list` shows them"
        raise ConfigError(f"launch recipe {name!r} does not exist{hint}")
    return {"name": name.replace("/", "-"), **RECIPES[name]}
