"""NFT with a sequence-level ratio: the official NFT code's `ratio_type=sequence` (NVlabs/NFT dp_actor.py).

One ratio per answer instead of one per token, from the answer's summed token log-ratios (a sum, not a
mean, as the official code), capped at `max_log_ratio` (no gradient beyond) before the exponential:

    Δ = Σ_t m_t·(log π_θ - log π_old)_t,   R = exp(min(Δ, 10)),
    ℓ = ω(r̂)·[-r·log R - (1-r)·log max_v((1 - r̂R)/(1 - r̂), ε)]   per answer,   L = Σ_answers ℓ / agg_norm,

with NFT's straight-through floor, r̂ clamp and prompt weights (nft.py). The official code sums the
answers' losses without a divisor (recipes/algo/nft_seq.yaml sets agg_norm: 1). At R = 1 (on-policy) its
gradient is the token-level NFT's. Rows are independent (no group coupling): any micro-batching that
keeps a row whole, which the actor's always does, gives the same gradient. The ratio statistics stay
per token (R_t), as for every algorithm; the floor count is the negative tokens of floored answers.
"""

from __future__ import annotations

from torch import Tensor

from megatron_nft.algorithms.base import Algorithm, LossInputs, LossOptions
from megatron_nft.algorithms.nft import capped_log_ratio, negative_log_ratio, nft_weights
from megatron_nft.algorithms.stats import LossStats, token_stats


class SequenceRatioNFT(Algorithm):
    name = "nft_seq"
    sequence_level = True
    aggregations = ("token_sum_norm",)  # Σ over answers / agg_norm
    dynamic_sampling = True
    default_prompt_weight = "one_minus_r"

    def loss(self, x: LossInputs, options: LossOptions) -> tuple[Tensor, LossStats]:
        rhat, omega = (t[:, 0] for t in nft_weights(x, options))
        capped = capped_log_ratio((x.weight * x.log_ratio).sum(dim=1), options.max_log_ratio)
        negative, floored = negative_log_ratio(capped, rhat, options.neg_clip)
        per_answer = -omega * (x.rewards * capped + (1.0 - x.rewards) * negative)
        loss = per_answer.sum() / options.agg_norm
        neg_floor_tokens = (x.neg & floored[:, None]).sum().to(x.dtype)
        return loss, LossStats(**token_stats(loss, x.ratio, x.valid, x.pos, x.neg, neg_floor_tokens=neg_floor_tokens))


ALGORITHM = SequenceRatioNFT()
