"""The GRPO family's PPO-clipped loss on a group-relative advantage: GRPO (A = (r - r̂)/σ) and Dr.GRPO
(A = r - r̂); DAPO (dapo.py) adds clip-higher. ℓ_t = -min(R_t·A, clip(R_t)·A), clipped to
[1 - clip_low, 1 + clip_low] (DAPO: 1 + clip_high). Zero-variance groups have A = 0: every group is used."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from megatron_nft.algorithms.base import ADV_STDS, Algorithm, LossInputs, LossOptions
from megatron_nft.algorithms.groups import check_choice
from megatron_nft.algorithms.stats import LossStats, token_stats

ADV_EPS = 1e-6  # added to the group std in GRPO/DAPO's advantage (verl's epsilon)


class GroupRelative(Algorithm):
    """The family: PPO clip on the advantage of each answer within its group."""

    dynamic_sampling = False
    shaped_rewards = True  # the advantage takes any rewards (their group std is measured)
    std_normalized: ClassVar[bool] = True  # A = (r - r̂)/σ; else r - r̂
    clip_higher: ClassVar[bool] = False  # the upper clip is 1 + clip_high, not 1 + clip_low

    def advantages(self, rewards: Tensor, correct_rate: Tensor, reward_std: Tensor | None = None, *,
                   std: str = "unbiased", group_size: int | None = None) -> Tensor:
        """See the package's `advantages`."""
        check_choice("std", std, ADV_STDS)
        r, rhat = rewards.detach(), correct_rate.detach()
        unbiased = std == "unbiased"
        if unbiased and group_size is None and self.std_normalized:
            raise ValueError(f"{self.name}'s advantage with std='unbiased' needs group_size (K, for Bessel's K/(K-1)); "
                             f"pass it, or std='population'")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"group_size must be a positive int; got {group_size!r}")
        single = unbiased and group_size == 1
        if single:
            rhat = torch.zeros_like(rhat)
        if not self.std_normalized:
            return r - rhat
        if single:
            return r / (1.0 + ADV_EPS)
        if reward_std is None:
            sigma = (rhat * (1.0 - rhat)).clamp_min(0.0).sqrt()
        else:
            sigma = reward_std.detach().to(r.dtype)
        if unbiased:
            sigma = sigma * math.sqrt(group_size / (group_size - 1))
        return (r - rhat) / (sigma + ADV_EPS)

    def loss(self, x: LossInputs, options: LossOptions) -> tuple[Tensor, LossStats]:
        adv = self.advantages(x.rewards, x.correct_rate, x.reward_std, std=options.adv_std,
                              group_size=options.group_size)[:, None]
        high = options.clip_high if self.clip_higher else options.clip_low
        # -min(R·A, clip(R)·A): the clipped term is the smaller one exactly when A > 0 and R > 1+high, or
        # A < 0 and R < 1-low; there its gradient is 0.
        active = ((adv > 0) & (x.ratio > 1.0 + high)) | ((adv < 0) & (x.ratio < 1.0 - options.clip_low))
        clipped = x.ratio.clamp(1.0 - options.clip_low, 1.0 + high)
        per_token = -adv * torch.where(active, clipped, x.ratio)
        loss = x.token_sum(per_token, options)
        return loss, LossStats(**token_stats(loss, x.ratio, x.valid, x.pos, x.neg, clip_tokens=(x.valid & active).sum().to(x.dtype),
                                             adv_sum=(adv * x.valid).sum()))


class GRPO(GroupRelative):
    name = "grpo"


class DrGRPO(GroupRelative):
    """GRPO without the std normalisation of the advantage."""

    name = "dr_grpo"
    std_normalized = False


GRPO_ALGORITHM = GRPO()
DR_GRPO_ALGORITHM = DrGRPO()
