"""RFT, rejection-sampling fine-tuning: the likelihood of the right answers, ℓ_t = -ω(r̂)·r·log R_t (NFT
without its negatives, with NFT's cap and clamp). ω = 1 by default (the paper's RFT); the official
scripts run ω = 1 - r̂ (recipes/algo/rft.yaml). Every group is used: rejection sampling needs no mixed
groups."""

from __future__ import annotations

from torch import Tensor

from megatron_nft.algorithms.base import Algorithm, LossInputs, LossOptions
from megatron_nft.algorithms.nft import capped_log_ratio, nft_weights
from megatron_nft.algorithms.stats import LossStats, token_stats


class RFT(Algorithm):
    name = "rft"
    dynamic_sampling = False
    default_prompt_weight = "uniform"

    def loss(self, x: LossInputs, options: LossOptions) -> tuple[Tensor, LossStats]:
        _, omega = nft_weights(x, options)
        per_token = -omega * x.rewards[:, None] * capped_log_ratio(x.log_ratio, options.max_log_ratio)
        loss = x.token_sum(per_token, options)
        return loss, LossStats(**token_stats(loss, x.ratio, x.valid, x.pos, x.neg))


ALGORITHM = RFT()
