"""Pure-torch algorithms: the policy losses (one object per algorithm, one module each: nft, rft, grpo
and dr_grpo, dapo, infonca, nft_seq; registry.py finds them), their typed statistics (stats.py), prompt
weights, group statistics and the dynamic-sampling filter. No Megatron imports."""

from megatron_nft.algorithms.base import ADV_STDS, AGGREGATIONS, MAX_LOG_RATIO, Algorithm, LossInputs, LossOptions
from megatron_nft.algorithms.groups import (
    PROMPT_WEIGHTS,
    RHAT_CLAMP,
    GroupFilter,
    clamp_correct_rate,
    dynamic_sampling_keep,
    group_correct_rate,
    group_reward_std,
    prompt_weights,
)
from megatron_nft.algorithms.grpo import ADV_EPS
from megatron_nft.algorithms.infonca import infonca_targets
from megatron_nft.algorithms.losses import advantages, policy_loss, truncated_is_weights
from megatron_nft.algorithms.registry import DEFAULT, PAPER_TABLE, algorithm, algorithms, is_algorithm, names
from megatron_nft.algorithms.stats import LossStats, MicroBatchReduction, StepStats, average_steps, token_stats

# The paper's six compared algorithms (recipes/paper has a recipe for each); every registered one is names().
ALGORITHMS = PAPER_TABLE

__all__ = [
    "ADV_EPS",
    "ADV_STDS",
    "AGGREGATIONS",
    "ALGORITHMS",
    "DEFAULT",
    "MAX_LOG_RATIO",
    "PAPER_TABLE",
    "PROMPT_WEIGHTS",
    "RHAT_CLAMP",
    "Algorithm",
    "GroupFilter",
    "LossInputs",
    "LossOptions",
    "LossStats",
    "MicroBatchReduction",
    "StepStats",
    "advantages",
    "algorithm",
    "algorithms",
    "average_steps",
    "clamp_correct_rate",
    "dynamic_sampling_keep",
    "group_correct_rate",
    "group_reward_std",
    "infonca_targets",
    "is_algorithm",
    "names",
    "policy_loss",
    "prompt_weights",
    "token_stats",
    "truncated_is_weights",
]
