"""The functional entry point to the policy losses, :func:`policy_loss`, and the loss-side helpers the
trainer uses (truncated importance sampling, the GRPO family's advantage by name).

Everything works on ``[B, T]`` per-token log-probs of the sampled tokens (``T`` = response positions,
``mask`` selects the ones that count) and ``[B]`` per-response reward ``r`` and group correct rate ``r̂``.
Pure torch, no Megatron: the actor calls :func:`policy_loss` on each micro-batch. Each algorithm is an
object in its own module (registry.py); this module checks the common arguments, prepares the inputs
and dispatches.

Aggregation and micro-batching: ``agg="token_sum_norm"`` is ``Σ mask·ℓ / agg_norm``, a plain sum over
rows divided by a constant, so it is additive over any split of the rows (micro-batches, data-parallel
ranks). ``agg="token_mean"`` over a whole minibatch equals ``token_sum_norm`` with ``agg_norm`` = the
minibatch's token count, which is how the actor computes it across micro-batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_nft.algorithms.base import ADV_STDS, AGGREGATIONS, MAX_LOG_RATIO, LossInputs, LossOptions, check_number
from megatron_nft.algorithms.groups import PROMPT_WEIGHTS, RHAT_CLAMP, check_choice
from megatron_nft.algorithms.grpo import GroupRelative
from megatron_nft.algorithms.registry import algorithm as get_algorithm
from megatron_nft.algorithms.registry import algorithms, names


def advantages(
    algorithm: str,
    rewards: Tensor,
    correct_rate: Tensor,
    reward_std: Tensor | None = None,
    *,
    std: str = "unbiased",
    group_size: int | None = None,
) -> Tensor:
    """The group-relative advantage of the GRPO family, per response (same shape as ``rewards``).

    grpo / dapo: A = (r - r̂) / (σ + 1e-6); dr_grpo: A = r - r̂. ``reward_std`` is the population std of
    each response's group rewards (shaped, non-binary rewards); None: sqrt(r̂(1 - r̂)), which it is for
    binary rewards. σ is that population std (std="population") or, as verl's torch.std, the sample std
    sqrt(K/(K-1)) times it (std="unbiased", the default; needs ``group_size`` K). Groups whose rewards
    are all equal get A = 0. K = 1 with std="unbiased": the sample std is undefined and verl takes the
    group's mean as 0 and its std as 1, so A = r / (1 + 1e-6) (dr_grpo: A = r); the trainer refuses K = 1.
    """
    family = tuple(a.name for a in algorithms() if isinstance(a, GroupRelative))
    check_choice("algorithm", algorithm, family)
    return get_algorithm(algorithm).advantages(rewards, correct_rate, reward_std, std=std, group_size=group_size)


def truncated_is_weights(actor_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Token-level truncated importance sampling (TIS): min(π_old_actor / π_rollout, cap) per token, 0
    where mask is 0. The answers were sampled by the rollout engine; the loss is written for the
    actor's π_old: these weights correct the difference (bf16 vs fp32 kernels, stale weights)."""
    check_number("cap", cap, low=0.0, low_inclusive=False)
    valid = mask if mask.dtype == torch.bool else mask > 0
    log_ratio = torch.where(valid, actor_logprobs.detach() - rollout_logprobs.detach(), 0.0)
    return torch.where(valid, torch.exp(log_ratio).clamp(max=cap), 0.0)


def policy_loss(
    algorithm: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    rewards: Tensor,
    correct_rate: Tensor,
    mask: Tensor,
    *,
    prompt_weight: str | None = None,
    neg_clip: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    agg: str = "token_sum_norm",
    agg_norm: float = 1000.0,
    reward_std: Tensor | None = None,
    group_size: int | None = None,
    beta: float = 0.1,
    sft_coef: float = 0.0,
    target_temperature: float = 0.0,
    adv_std: str = "unbiased",
    max_log_ratio: float | None = MAX_LOG_RATIO,
    rhat_clamp: float = RHAT_CLAMP,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy loss of one (micro-)batch and its stats.

    Args:
        algorithm: a registered name (registry.names(): nft, rft, grpo, dr_grpo, dapo, infonca, nft_seq).
        logprobs: [B, T] log π_θ of the sampled tokens (the gradient flows from here).
        old_logprobs: [B, T] log π_old of the same tokens (detached).
        rewards: [B] reward r of each response (the verifier's {0, 1}).
        correct_rate: [B] mean reward r̂ of each response's group.
        mask: [B, T] bool or float; the tokens that count (a float mask weights ℓ; positions with
            mask <= 0 are ignored entirely, whatever their log-probs, inf/NaN included).
        prompt_weight: ω(q) of the NFT losses (nft, rft, nft_seq): "uniform" | "one_minus_r" | "grpo"
            (see groups.prompt_weights); None: the algorithm's own (nft 1 - r̂, rft 1); ignored by the others.
        neg_clip: NFT's ε > 0 in max_v((1 - r̂R)/(1 - r̂), ε).
        clip_low / clip_high: PPO ratio clip; grpo and dr_grpo clip to [1-clip_low, 1+clip_low], dapo to
            [1-clip_low, 1+clip_high].
        agg: "token_sum_norm" (Σ mask·ℓ / agg_norm) | "token_mean" (Σ mask·ℓ / max(Σ mask, 1)) for the
            per-token losses; infonca: "token_sum_norm" (Σ_g ℓ_g / agg_norm) | "group_mean" (Σ_g ℓ_g / G);
            nft_seq: "token_sum_norm" (Σ over answers / agg_norm). Each algorithm's `aggregations`.
        agg_norm: the constant divisor of token_sum_norm (> 0).
        reward_std: [B] population std of each response's group rewards, for grpo / dapo's advantage
            with shaped (non-binary) rewards; None: sqrt(r̂(1-r̂)), exact for binary rewards.
        group_size: K, the answers per prompt; required by infonca (rows g*K..(g+1)*K-1 form group g)
            and by grpo / dapo with adv_std="unbiased" (Bessel's correction).
        beta: infonca's β on the sequence log-ratio.
        sft_coef: infonca's λ on the length-normalised NLL of the target answers.
        target_temperature: infonca's reward temperature α (0: hard targets, see infonca_targets).
        adv_std: grpo / dapo's group std, "unbiased" (verl's torch.std) | "population" (see advantages).
        max_log_ratio: NFT losses: log R is capped there, with no gradient beyond (the official code's
            exp(min(log R, 10))); None: no cap.
        rhat_clamp: NFT losses: r̂ of mixed groups clamped to [c, 1 - c] in ω and in the negative term
            (the official code's 0.02); 0: off. See groups.clamp_correct_rate.

    The losses, with R = exp(logprobs - old_logprobs), are in their modules' docstrings: nft.py, rft.py,
    grpo.py (grpo, dr_grpo), dapo.py, infonca.py, nft_seq.py.

    Returns ``(loss, stats)``; stats are the fields of stats.LossStats as 0-dim detached float tensors
    (its declaration says how each reduces over micro-batches and ranks): loss, num_tokens, pos_tokens,
    neg_tokens, ratio_mean / min / max (per token; min / max are +inf / -inf without tokens),
    neg_floor_tokens / neg_floor_frac (NFT's ε floor), clip_tokens / clip_frac / adv_mean (GRPO family),
    num_groups (infonca); an algorithm's unused fields are 0.
    """
    alg = get_algorithm(algorithm)
    if prompt_weight is None:
        prompt_weight = alg.default_prompt_weight or "uniform"
    check_choice("prompt_weight", prompt_weight, PROMPT_WEIGHTS)
    check_choice("agg", agg, AGGREGATIONS)
    check_choice("adv_std", adv_std, ADV_STDS)
    if max_log_ratio is not None:
        check_number("max_log_ratio", max_log_ratio, low=0.0, low_inclusive=False)
    check_number("neg_clip", neg_clip, low=0.0, low_inclusive=False)
    check_number("clip_low", clip_low, low=0.0, low_inclusive=True, high=1.0)
    check_number("clip_high", clip_high, low=0.0, low_inclusive=True)
    check_number("agg_norm", agg_norm, low=0.0, low_inclusive=False)
    if agg not in alg.aggregations:
        raise ValueError(f"agg={agg!r} does not apply to algorithm {algorithm!r}: it takes {' or '.join(alg.aggregations)}")
    options = LossOptions(
        prompt_weight=prompt_weight, neg_clip=neg_clip, clip_low=clip_low, clip_high=clip_high, agg=agg,
        agg_norm=agg_norm, group_size=group_size, beta=beta, sft_coef=sft_coef,
        target_temperature=target_temperature, adv_std=adv_std, max_log_ratio=max_log_ratio, rhat_clamp=rhat_clamp,
    )
    alg.check_options(options, logprobs.shape[0] if logprobs.dim() == 2 else None)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T]; got shape {tuple(logprobs.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask)):
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} must have the shape of logprobs {tuple(logprobs.shape)}; got {tuple(t.shape)}")
    for name, t in (("rewards", rewards), ("correct_rate", correct_rate), ("reward_std", reward_std)):
        if t is not None and t.shape != logprobs.shape[:1]:
            raise ValueError(f"{name} must be [B] with B={logprobs.shape[0]}; got shape {tuple(t.shape)}")
    loss, stats = alg.loss(_inputs(logprobs, old_logprobs, rewards, correct_rate, mask, reward_std), options)
    return loss, stats.as_dict()


def _inputs(logprobs, old_logprobs, rewards, correct_rate, mask, reward_std) -> LossInputs:
    dtype = torch.promote_types(logprobs.dtype, torch.float32)  # bf16/fp16 log-probs are computed in fp32
    valid = mask if mask.dtype == torch.bool else mask > 0
    log_ratio = torch.where(valid, logprobs.to(dtype) - old_logprobs.detach().to(dtype), 0.0)
    r = rewards.detach().to(dtype)
    positive = valid & (r[:, None] > 0.5)
    return LossInputs(
        logprobs=logprobs.to(dtype),
        log_ratio=log_ratio,
        ratio=torch.exp(log_ratio),
        valid=valid,
        weight=torch.where(valid, mask.to(dtype), 0.0),
        rewards=r,
        correct_rate=correct_rate.detach().to(dtype),
        reward_std=reward_std,
        pos=positive,
        neg=valid & ~(r[:, None] > 0.5),
    )


__all__ = ["advantages", "names", "policy_loss", "truncated_is_weights"]
