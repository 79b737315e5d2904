"""Pure-torch algorithms: the NFT / RFT / GRPO / Dr.GRPO / DAPO / InfoNCA policy losses, prompt weights,
group statistics and the dynamic-sampling filter. No Megatron imports."""

from megatron_nft.algorithms.groups import (
    PROMPT_WEIGHTS,
    GroupFilter,
    dynamic_sampling_keep,
    group_correct_rate,
    group_reward_std,
    prompt_weights,
)
from megatron_nft.algorithms.losses import (
    ADV_EPS,
    AGGREGATIONS,
    ALGORITHMS,
    DEFAULT_AGG,
    GRPO_FAMILY,
    STATS_KEYS,
    STATS_MAX,
    STATS_MEAN,
    STATS_MIN,
    STATS_SUM,
    advantages,
    infonca_targets,
    policy_loss,
)

__all__ = [
    "ADV_EPS",
    "AGGREGATIONS",
    "ALGORITHMS",
    "DEFAULT_AGG",
    "GRPO_FAMILY",
    "PROMPT_WEIGHTS",
    "STATS_KEYS",
    "STATS_MAX",
    "STATS_MEAN",
    "STATS_MIN",
    "STATS_SUM",
    "GroupFilter",
    "advantages",
    "dynamic_sampling_keep",
    "group_correct_rate",
    "group_reward_std",
    "infonca_targets",
    "policy_loss",
    "prompt_weights",
]
