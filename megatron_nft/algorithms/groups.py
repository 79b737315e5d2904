"""Group statistics over the K answers of one prompt: correct rate, prompt weights, dynamic sampling.

Rows are grouped contiguously: responses ``[g*K, (g+1)*K)`` answer prompt ``g``. Rewards are the
verifier's ``r in {0, 1}``; ``r̂`` (the "correct rate") is the group mean. Pure torch, no Megatron.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

PROMPT_WEIGHTS = ("uniform", "one_minus_r", "grpo")
# The official NFT code clamps r̂ to [0.02, 0.98] wherever it uses it (prompt weight and the negative
# ratio's (1 - r̂R)/(1 - r̂)); it only acts on groups of more than 50 answers (r̂ = 1/K < 0.02).
RHAT_CLAMP = 0.02


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise ValueError naming the argument and the allowed values unless ``value`` is one of them."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _float(t: Tensor) -> Tensor:
    t = torch.as_tensor(t).detach()
    return t if t.is_floating_point() else t.to(torch.float32)


def _check_groups(rewards: Tensor, group_size: int) -> Tensor:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int; got {group_size!r}")
    rewards = _float(rewards)
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be a 1-D tensor whose length is a multiple of group_size={group_size}; "
            f"got shape {tuple(rewards.shape)}"
        )
    return rewards


def group_correct_rate(rewards: Tensor, group_size: int) -> Tensor:
    """Per response, the mean reward of its group: ``[N*K] -> [N*K]`` (float; int/bool become float32)."""
    rewards = _check_groups(rewards, group_size)
    return rewards.view(-1, group_size).mean(dim=1).repeat_interleave(group_size)


def group_reward_std(rewards: Tensor, group_size: int) -> Tensor:
    """Per response, the population std of its group's rewards: ``[N*K] -> [N*K]``. For binary rewards
    it is sqrt(r̂(1 - r̂)); shaped rewards (DAPO's over-long penalty) need it computed."""
    rewards = _check_groups(rewards, group_size)
    return rewards.view(-1, group_size).std(dim=1, correction=0).repeat_interleave(group_size)


def prompt_weights(correct_rate: Tensor, kind: str) -> Tensor:
    """NFT's prompt weight ω(q) from the group correct rate r̂, elementwise (same shape as the input).

    - ``"uniform"``:     ω = 1
    - ``"one_minus_r"``: ω = 1 - r̂ (paper default; NFT then equals Dr.GRPO on-policy)
    - ``"grpo"``:        ω = sqrt((1 - r̂) / r̂) (NFT then equals GRPO on-policy); ω = 0 at r̂ = 0, where
      GRPO's advantage is 0 too (and NFT's loss has no positive and a constant negative term there).
    """
    check_choice("prompt_weight", kind, PROMPT_WEIGHTS)
    rhat = _float(correct_rate)
    if kind == "uniform":
        return torch.ones_like(rhat)
    wrong = (1.0 - rhat).clamp_min(0.0)
    if kind == "one_minus_r":
        return wrong
    tiny = torch.finfo(rhat.dtype).tiny
    return torch.where(rhat > 0, (wrong / rhat.clamp_min(tiny)).sqrt(), torch.zeros_like(rhat))


def clamp_correct_rate(correct_rate: Tensor, clamp: float) -> Tensor:
    """r̂ of mixed groups (0 < r̂ < 1) clamped to [clamp, 1 - clamp], as the official NFT code does; groups
    with r̂ in {0, 1} keep it (the official code never sees them: dynamic sampling drops them and it
    asserts so; here they keep their exact meaning, e.g. a zero GRPO-equivalent gradient). clamp = 0: off."""
    if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not 0.0 <= clamp < 0.5:
        raise ValueError(f"rhat_clamp must be a number in [0, 0.5); got {clamp!r}")
    rhat = _float(correct_rate)
    if clamp == 0:
        return rhat
    mixed = (rhat > 0) & (rhat < 1)
    return torch.where(mixed, rhat.clamp(clamp, 1.0 - clamp), rhat)


class GroupFilter(NamedTuple):
    """Result of :func:`dynamic_sampling_keep`; unpacks as ``keep, all_right, all_wrong``.

    keep:      BoolTensor[N], True for groups with 0 < r̂ < 1 (they carry a learning signal).
    all_right: number of groups with r̂ >= 1 (python int).
    all_wrong: number of groups with r̂ <= 0 (python int).
    """

    keep: Tensor
    all_right: int
    all_wrong: int


def dynamic_sampling_keep(rewards: Tensor, group_size: int) -> GroupFilter:
    """DAPO dynamic sampling over ``[N*K]`` rewards: which of the N groups are mixed (0 < r̂ < 1).

    Assumes rewards in [0, 1] (the verifier's {0, 1}); a group is "all right" when its mean is 1 and
    "all wrong" when it is 0.
    """
    rewards = _check_groups(rewards, group_size)
    rhat = rewards.view(-1, group_size).mean(dim=1)
    right = rhat >= 1
    wrong = rhat <= 0
    return GroupFilter(keep=~(right | wrong), all_right=int(right.sum()), all_wrong=int(wrong.sum()))
