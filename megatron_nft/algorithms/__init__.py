"""Pure-torch algorithms: the NFT / RFT / GRPO / Dr.GRPO / DAPO policy losses, prompt weights, group
statistics and the dynamic-sampling filter. No Megatron imports."""

from megatron_nft.algorithms.groups import (
    PROMPT_WEIGHTS,
    GroupFilter,
    dynamic_sampling_keep,
    group_correct_rate,
    prompt_weights,
)
from megatron_nft.algorithms.losses import (
    ADV_EPS,
    AGGREGATIONS,
    ALGORITHMS,
    GRPO_FAMILY,
    STATS_KEYS,
    STATS_MAX,
    STATS_MEAN,
    STATS_MIN,
    STATS_SUM,
    advantages,
    policy_loss,
)

__all__ = [
    "ADV_EPS",
    "AGGREGATIONS",
    "ALGORITHMS",
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
    "policy_loss",
    "prompt_weights",
]
