"""NFT, the paper's eq. 10: positives by likelihood, negatives through the implicit negative policy.

    ℓ_t = ω(r̂)·[-r·log R_t - (1-r)·log max_v((1 - r̂R_t)/(1 - r̂), ε)],   R_t = π_θ/π_old per token,

max_v(x, ε) = x + stopgrad(max(x, ε) - x): value max(x, ε), gradient ∇x / max(x, ε) (straight-through,
never zeroed). As the official code: log R capped at `max_log_ratio` with no gradient beyond, r̂ of
mixed groups clamped to [c, 1 - c] (`rhat_clamp`). The helpers here are shared with RFT (NFT without
its negatives) and the sequence-ratio variant (nft_seq.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_nft.algorithms.base import Algorithm, LossInputs, LossOptions
from megatron_nft.algorithms.groups import clamp_correct_rate, prompt_weights
from megatron_nft.algorithms.stats import LossStats, token_stats


def capped_log_ratio(log_ratio: Tensor, max_log_ratio: float | None) -> Tensor:
    """log R capped: torch.clamp passes no gradient beyond the cap, so a ratio past e^10 stops pulling."""
    return log_ratio if max_log_ratio is None else log_ratio.clamp(max=max_log_ratio)


def nft_weights(x: LossInputs, options: LossOptions) -> tuple[Tensor, Tensor]:
    """r̂ [B, 1] clamped as the official code, and ω(r̂) [B, 1] in the loss dtype."""
    rhat = clamp_correct_rate(x.correct_rate[:, None], options.rhat_clamp)
    return rhat, prompt_weights(rhat, options.prompt_weight).to(x.dtype)


def negative_log_ratio(capped: Tensor, rhat: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """log max_v((1 - r̂R)/(1 - r̂), ε) for R = exp(capped), and where the ε floor holds (bool)."""
    # A response with r̂ = 1 is positive (its (1-r) factor is 0); dividing by 1 there keeps it finite.
    one_minus = torch.where(rhat < 1, 1.0 - rhat, 1.0)
    # y = x - 1 = -r̂(R - 1)/(1 - r̂), via expm1 so that x is exactly 1 at R = 1 (the first minibatch's
    # loss is then exactly 0) and log1p keeps precision near R = 1.
    y = -(rhat / one_minus) * torch.expm1(capped)
    floor = eps - 1.0
    y_detached = y.detach()
    # max_v: value max(y, ε-1), gradient that of y (straight-through: scaled by 1/max(x, ε), never zeroed).
    y_v = y_detached.clamp_min(floor) + (y - y_detached)
    return torch.log1p(y_v), y_detached < floor


class NFT(Algorithm):
    name = "nft"
    dynamic_sampling = True
    default_prompt_weight = "one_minus_r"

    def loss(self, x: LossInputs, options: LossOptions) -> tuple[Tensor, LossStats]:
        r = x.rewards[:, None]
        rhat, omega = nft_weights(x, options)
        capped = capped_log_ratio(x.log_ratio, options.max_log_ratio)
        negative, floored = negative_log_ratio(capped, rhat, options.neg_clip)
        per_token = -omega * (r * capped + (1.0 - r) * negative)
        loss = x.token_sum(per_token, options)
        neg_floor_tokens = (x.neg & floored).sum().to(x.dtype)
        return loss, LossStats(**token_stats(loss, x.ratio, x.valid, x.pos, x.neg, neg_floor_tokens=neg_floor_tokens))


ALGORITHM = NFT()
