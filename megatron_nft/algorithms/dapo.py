"""DAPO: the GRPO family's loss with clip-higher ([1 - clip_low, 1 + clip_high], 0.2 / 0.28), a token
mean over the minibatch, dynamic sampling, and over-long reward shaping (a penalty over the last fifth
of the response budget by default; reward.overlong_buffer sets it)."""

from __future__ import annotations

from megatron_nft.algorithms.grpo import GroupRelative


class DAPO(GroupRelative):
    name = "dapo"
    clip_higher = True
    aggregations = ("token_mean", "token_sum_norm")
    dynamic_sampling = True
    # DAPO's over-long buffer is 4096 of its 20480-token budget: a fifth of rollout.max_new_tokens.
    overlong_buffer_fraction = 0.2


ALGORITHM = DAPO()
