"""The policy losses: NFT (the paper's eq. 10) and its baselines RFT, GRPO, Dr.GRPO, DAPO and iterative
DPO as InfoNCA over the K answers of a prompt.

Everything works on ``[B, T]`` per-token log-probs of the sampled tokens (``T`` = response positions,
``mask`` selects the ones that count) and ``[B]`` per-response reward ``r`` and group correct rate ``r̂``.
Pure torch, no Megatron: the actor calls :func:`policy_loss` on each micro-batch. InfoNCA is the one
sequence-level loss: it needs every group's K rows in the same call (rows ``[g*K, (g+1)*K)``).

Aggregation and micro-batching: ``agg="token_sum_norm"`` is ``Σ mask·ℓ / agg_norm``, a plain sum over
rows divided by a constant, so it is additive over any split of the rows (micro-batches, data-parallel
ranks). ``agg="token_mean"`` over a whole minibatch equals ``token_sum_norm`` with ``agg_norm`` = the
minibatch's token count, which is how the actor computes it across micro-batches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megatron_nft.algorithms.groups import PROMPT_WEIGHTS, RHAT_CLAMP, check_choice, clamp_correct_rate, prompt_weights

ALGORITHMS = ("nft", "rft", "grpo", "dr_grpo", "dapo", "infonca")
GRPO_FAMILY = ("grpo", "dr_grpo", "dapo")
# token_sum_norm / token_mean aggregate per-token losses; group_mean averages InfoNCA's per-group losses.
AGGREGATIONS = ("token_sum_norm", "token_mean", "group_mean")
# The aggregation each algorithm uses unless told otherwise: the NFT reference code's sum / constant,
# DAPO's token-level mean, InfoNCA's mean over prompts.
DEFAULT_AGG = {"nft": "token_sum_norm", "rft": "token_sum_norm", "grpo": "token_sum_norm",
               "dr_grpo": "token_sum_norm", "dapo": "token_mean", "infonca": "group_mean"}
# The prompt weight ω(q) of the algorithms that take one (the NFT loss, and RFT as NFT without its
# negatives): NFT's paper default; RFT's paper definition ω = 1 (the official scripts run it with 1 - r̂).
DEFAULT_PROMPT_WEIGHT = {"nft": "one_minus_r", "rft": "uniform"}
ADV_EPS = 1e-6  # added to the group std in GRPO/DAPO's advantage (verl's epsilon)
# The group std of GRPO/DAPO's advantage: verl's torch.std (Bessel-corrected, K - 1) or the population's (K).
ADV_STDS = ("unbiased", "population")
# The official NFT code computes R = exp(min(log R, 10)): no gradient from a token beyond it.
MAX_LOG_RATIO = 10.0

# The stats policy_loss returns (0-dim detached float tensors). How to combine them over micro-batches
# and ranks: SUM keys add up; MEAN keys are means over the named count key (combine as
# Σ mean·count / Σ count); MIN / MAX keys reduce with min / max (an empty mask gives +inf / -inf, the
# identities of those reductions).
STATS_SUM = ("loss", "num_tokens", "pos_tokens", "neg_tokens", "neg_floor_tokens", "clip_tokens", "num_groups")
STATS_MEAN = {
    "ratio_mean": "num_tokens",
    "adv_mean": "num_tokens",
    "clip_frac": "num_tokens",
    "neg_floor_frac": "neg_tokens",
}
STATS_MIN = ("ratio_min",)
STATS_MAX = ("ratio_max",)
STATS_KEYS = STATS_SUM + tuple(STATS_MEAN) + STATS_MIN + STATS_MAX


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
    check_choice("algorithm", algorithm, GRPO_FAMILY)
    check_choice("std", std, ADV_STDS)
    r, rhat = rewards.detach(), correct_rate.detach()
    unbiased = std == "unbiased"
    if unbiased and group_size is None and algorithm != "dr_grpo":
        raise ValueError(f"{algorithm}'s advantage with std='unbiased' needs group_size (K, for Bessel's K/(K-1)); "
                         f"pass it, or std='population'")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive int; got {group_size!r}")
    single = unbiased and group_size == 1
    if single:
        rhat = torch.zeros_like(rhat)
    if algorithm == "dr_grpo":
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


def infonca_targets(rewards: Tensor, temperature: float) -> Tensor:
    """InfoNCA's target distribution over each group's K answers, ``[G, K] -> [G, K]``.

    temperature > 0: softmax(r / temperature); temperature = 0: the limit, uniform over the answers with
    the group's highest reward (with one right and one wrong answer: all mass on the right one, DPO).
    """
    r = rewards.detach()
    if temperature > 0:
        return torch.softmax(r / temperature, dim=-1)
    best = (r >= r.amax(dim=-1, keepdim=True)).to(r.dtype)
    return best / best.sum(dim=-1, keepdim=True)


def truncated_is_weights(actor_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Token-level truncated importance sampling (TIS): min(π_old_actor / π_rollout, cap) per token, 0
    where mask is 0. The answers were sampled by the rollout engine; the loss is written for the
    actor's π_old: these weights correct the difference (bf16 vs fp32 kernels, stale weights)."""
    _check_number("cap", cap, low=0.0, low_inclusive=False)
    valid = mask if mask.dtype == torch.bool else mask > 0
    log_ratio = torch.where(valid, actor_logprobs.detach() - rollout_logprobs.detach(), 0.0)
    return torch.where(valid, torch.exp(log_ratio).clamp(max=cap), 0.0)


def _check_number(name: str, value: float, *, low: float, low_inclusive: bool, high: float = math.inf) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_inclusive else value > low) and value < high
    if not ok:
        lo = f"[{low}" if low_inclusive else f"({low}"
        raise ValueError(f"{name} must be a finite number in {lo}, {high}); got {value!r}")


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
        algorithm: "nft" | "rft" | "grpo" | "dr_grpo" | "dapo" | "infonca".
        logprobs: [B, T] log π_θ of the sampled tokens (the gradient flows from here).
        old_logprobs: [B, T] log π_old of the same tokens (detached).
        rewards: [B] reward r of each response (the verifier's {0, 1}).
        correct_rate: [B] mean reward r̂ of each response's group.
        mask: [B, T] bool or float; the tokens that count (a float mask weights ℓ; positions with
            mask <= 0 are ignored entirely, whatever their log-probs, inf/NaN included).
        prompt_weight: ω(q) of nft and rft: "uniform" | "one_minus_r" | "grpo" (see groups.prompt_weights);
            None: the algorithm's own (DEFAULT_PROMPT_WEIGHT: nft 1 - r̂, rft 1); ignored by the others.
        neg_clip: NFT's ε > 0 in max_v((1 - r̂R)/(1 - r̂), ε).
        clip_low / clip_high: PPO ratio clip; grpo and dr_grpo clip to [1-clip_low, 1+clip_low], dapo to
            [1-clip_low, 1+clip_high].
        agg: "token_sum_norm" (Σ mask·ℓ / agg_norm) | "token_mean" (Σ mask·ℓ / max(Σ mask, 1)) for the
            per-token losses; infonca: "token_sum_norm" (Σ_g ℓ_g / agg_norm) | "group_mean" (Σ_g ℓ_g / G).
        agg_norm: the constant divisor of token_sum_norm (> 0).
        reward_std: [B] population std of each response's group rewards, for grpo / dapo's advantage
            with shaped (non-binary) rewards; None: sqrt(r̂(1-r̂)), exact for binary rewards.
        group_size: K, the answers per prompt; required by infonca (rows g*K..(g+1)*K-1 form group g)
            and by grpo / dapo with adv_std="unbiased" (Bessel's correction).
        beta: infonca's β on the sequence log-ratio.
        sft_coef: infonca's λ on the length-normalised NLL of the target answers.
        target_temperature: infonca's reward temperature α (0: hard targets, see infonca_targets).
        adv_std: grpo / dapo's group std, "unbiased" (verl's torch.std) | "population" (see advantages).
        max_log_ratio: nft / rft: log R is capped there, with no gradient beyond (the official code's
            exp(min(log R, 10))); None: no cap.
        rhat_clamp: nft / rft: r̂ of mixed groups clamped to [c, 1 - c] in ω and in the negative term
            (the official code's 0.02); 0: off. See groups.clamp_correct_rate.

    Per-token losses, with R = exp(logprobs - old_logprobs):
        nft:  ℓ = ω(r̂)·[-r·log R - (1-r)·log max_v((1 - r̂R)/(1 - r̂), ε)],
              max_v(x, ε) = x + stopgrad(max(x, ε) - x): value max(x, ε), gradient ∇x / max(x, ε);
              log R capped at max_log_ratio, r̂ clamped by rhat_clamp (both as the official code).
        rft:  ℓ = -ω(r̂)·r·log R (nft without negatives; the same cap and clamp).
        grpo / dr_grpo / dapo: ℓ = -min(R·A, clip(R)·A) with A from :func:`advantages`.
        infonca (per group g of K answers, Δ_k = Σ_t log R_t of answer k, p = infonca_targets(r)):
              ℓ_g = -Σ_k p_k·log softmax_k(β·Δ) + λ·Σ_k p_k·(-Σ_t log π_θ)/|y_k|;
              groups with no valid token (padding) are left out. At K = 2 with one right answer and
              λ = 0 this is DPO's -log σ(β(Δ_w - Δ_l)) with π_old as the reference.

    Returns ``(loss, stats)``; stats are 0-dim detached float tensors (see STATS_* for how to reduce):
        loss            the returned loss (sum-like: additive over row splits with token_sum_norm)
        num_tokens      tokens with mask > 0                                           (sum)
        pos_tokens      of those, tokens of responses with r > 0.5                     (sum)
        neg_tokens      of those, tokens of responses with r <= 0.5                    (sum)
        ratio_mean      mean R over num_tokens                                         (mean)
        ratio_min/max   min / max R over num_tokens (+inf / -inf when there are none)  (min / max)
        neg_floor_tokens nft: negative tokens whose (1 - r̂R)/(1 - r̂) < ε; else 0        (sum)
        neg_floor_frac  neg_floor_tokens / neg_tokens                                  (mean over neg_tokens)
        clip_tokens     grpo family: tokens where the clip is active in the min; else 0 (sum)
        clip_frac       clip_tokens / num_tokens                                       (mean over num_tokens)
        adv_mean        grpo family: mean advantage over num_tokens; else 0            (mean over num_tokens)
        num_groups      infonca: groups with a valid token; else 0                      (sum)
    """
    check_choice("algorithm", algorithm, ALGORITHMS)
    if prompt_weight is None:
        prompt_weight = DEFAULT_PROMPT_WEIGHT.get(algorithm, "uniform")
    check_choice("prompt_weight", prompt_weight, PROMPT_WEIGHTS)
    check_choice("agg", agg, AGGREGATIONS)
    check_choice("adv_std", adv_std, ADV_STDS)
    if max_log_ratio is not None:
        _check_number("max_log_ratio", max_log_ratio, low=0.0, low_inclusive=False)
    _check_number("neg_clip", neg_clip, low=0.0, low_inclusive=False)
    _check_number("clip_low", clip_low, low=0.0, low_inclusive=True, high=1.0)
    _check_number("clip_high", clip_high, low=0.0, low_inclusive=True)
    _check_number("agg_norm", agg_norm, low=0.0, low_inclusive=False)
    sequence_level = algorithm == "infonca"
    if (agg == "group_mean" and not sequence_level) or (agg == "token_mean" and sequence_level):
        raise ValueError(f"agg={agg!r} does not apply to algorithm {algorithm!r}: group_mean is for infonca "
                         f"(a sequence-level loss), token_mean for the per-token losses")
    if algorithm == "infonca":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ValueError(f"group_size must be an int >= 2 for infonca (it contrasts the K answers of a prompt); got {group_size!r}")
        if logprobs.dim() == 2 and logprobs.shape[0] % group_size:
            raise ValueError(f"infonca needs whole groups: {logprobs.shape[0]} rows is not a multiple of group_size={group_size}")
        _check_number("beta", beta, low=0.0, low_inclusive=False)
        _check_number("sft_coef", sft_coef, low=0.0, low_inclusive=True)
        _check_number("target_temperature", target_temperature, low=0.0, low_inclusive=True)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T]; got shape {tuple(logprobs.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask)):
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} must have the shape of logprobs {tuple(logprobs.shape)}; got {tuple(t.shape)}")
    for name, t in (("rewards", rewards), ("correct_rate", correct_rate), ("reward_std", reward_std)):
        if t is not None and t.shape != logprobs.shape[:1]:
            raise ValueError(f"{name} must be [B] with B={logprobs.shape[0]}; got shape {tuple(t.shape)}")

    dtype = torch.promote_types(logprobs.dtype, torch.float32)  # bf16/fp16 log-probs are computed in fp32
    valid = mask if mask.dtype == torch.bool else mask > 0
    weight = torch.where(valid, mask.to(dtype), 0.0)
    r = rewards.detach().to(dtype)[:, None]
    rhat = correct_rate.detach().to(dtype)[:, None]
    # Masked positions get log R = 0 (R = 1): padding log-probs can be anything, and 0·inf would be NaN.
    log_ratio = torch.where(valid, logprobs.to(dtype) - old_logprobs.detach().to(dtype), 0.0)
    ratio = torch.exp(log_ratio)
    pos = valid & (r > 0.5)
    neg = valid & ~(r > 0.5)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    neg_floor_tokens = clip_tokens = adv_sum = num_groups = zero

    if algorithm in DEFAULT_PROMPT_WEIGHT:  # nft and rft: the official code's NFT loss
        rhat = clamp_correct_rate(rhat, rhat_clamp)
        omega = prompt_weights(rhat, prompt_weight).to(dtype)
        # torch.clamp passes no gradient beyond the cap: a token whose ratio ran past e^10 stops pulling.
        capped = log_ratio if max_log_ratio is None else log_ratio.clamp(max=max_log_ratio)
    if algorithm == "nft":
        # A response with r̂ = 1 is positive (its (1-r) factor is 0); dividing by 1 there keeps it finite.
        one_minus = torch.where(rhat < 1, 1.0 - rhat, 1.0)
        # y = x - 1 = -r̂(R - 1)/(1 - r̂), via expm1 so that x is exactly 1 at R = 1 (the first minibatch's
        # loss is then exactly 0) and log1p keeps precision near R = 1.
        y = -(rhat / one_minus) * torch.expm1(capped)
        floor = neg_clip - 1.0
        y_detached = y.detach()
        # max_v: value max(y, ε-1), gradient that of y (straight-through: scaled by 1/max(x, ε), never zeroed).
        y_v = y_detached.clamp_min(floor) + (y - y_detached)
        per_token = -omega * (r * capped + (1.0 - r) * torch.log1p(y_v))
        neg_floor_tokens = (neg & (y_detached < floor)).sum().to(dtype)
    elif algorithm == "rft":
        per_token = -omega * r * capped
    elif algorithm == "infonca":
        group_losses, group_valid = _infonca_group_losses(
            logprobs.to(dtype), log_ratio, weight, valid, rewards.detach().to(dtype), group_size,
            beta=beta, sft_coef=sft_coef, target_temperature=target_temperature,
        )
        num_groups = group_valid.sum().to(dtype)
        norm = agg_norm if agg == "token_sum_norm" else num_groups.clamp_min(1.0)
        return _finish(group_losses.sum() / norm, ratio, valid, pos, neg, dtype, num_groups=num_groups)
    else:
        adv = advantages(algorithm, rewards.to(dtype), correct_rate.to(dtype), reward_std, std=adv_std,
                         group_size=group_size)[:, None]
        high = clip_high if algorithm == "dapo" else clip_low
        # -min(R·A, clip(R)·A): the clipped term is the smaller one exactly when A > 0 and R > 1+high, or
        # A < 0 and R < 1-low; there its gradient is 0.
        active = ((adv > 0) & (ratio > 1.0 + high)) | ((adv < 0) & (ratio < 1.0 - clip_low))
        clipped = ratio.clamp(1.0 - clip_low, 1.0 + high)
        per_token = -adv * torch.where(active, clipped, ratio)
        clip_tokens = (valid & active).sum().to(dtype)
        adv_sum = (adv * valid).sum()

    total = (weight * per_token).sum()
    norm = agg_norm if agg == "token_sum_norm" else weight.sum().detach().clamp_min(1.0)
    return _finish(total / norm, ratio, valid, pos, neg, dtype, neg_floor_tokens=neg_floor_tokens,
                   clip_tokens=clip_tokens, adv_sum=adv_sum)


def _infonca_group_losses(logprobs, log_ratio, weight, valid, rewards, group_size, *, beta, sft_coef, target_temperature):
    """Per-group InfoNCA losses [G] and which groups hold a valid token [G] (see policy_loss)."""
    k = group_size
    seq_log_ratio = (weight * log_ratio).sum(dim=1).view(-1, k)  # Δ_k
    lengths = weight.sum(dim=1).view(-1, k)
    group_valid = lengths.sum(dim=1) > 0
    targets = infonca_targets(rewards.view(-1, k), target_temperature)
    contrast = -(targets * torch.log_softmax(beta * seq_log_ratio, dim=-1)).sum(dim=-1)
    nll = -(weight * torch.where(valid, logprobs, 0.0)).sum(dim=1).view(-1, k) / lengths.clamp_min(1.0)
    sft = (targets * nll).sum(dim=-1)
    return torch.where(group_valid, contrast + sft_coef * sft, 0.0), group_valid


def _finish(loss, ratio, valid, pos, neg, dtype, *, neg_floor_tokens=None, clip_tokens=None, adv_sum=None, num_groups=None):
    """The loss and its stats (see policy_loss's docstring)."""
    zero = torch.zeros((), dtype=dtype, device=ratio.device)
    neg_floor_tokens = zero if neg_floor_tokens is None else neg_floor_tokens
    clip_tokens = zero if clip_tokens is None else clip_tokens
    adv_sum = zero if adv_sum is None else adv_sum
    num_groups = zero if num_groups is None else num_groups
    with torch.no_grad():
        num = valid.sum().to(dtype)
        num_neg = neg.sum().to(dtype)
        ratio_d = ratio.detach()
        if ratio_d.numel():
            ratio_min = ratio_d.masked_fill(~valid, math.inf).amin()
            ratio_max = ratio_d.masked_fill(~valid, -math.inf).amax()
        else:
            ratio_min, ratio_max = zero + math.inf, zero - math.inf
        stats = {
            "loss": loss.detach().clone(),
            "num_tokens": num,
            "pos_tokens": pos.sum().to(dtype),
            "neg_tokens": num_neg,
            "ratio_mean": (ratio_d * valid).sum() / num.clamp_min(1.0),
            "ratio_min": ratio_min,
            "ratio_max": ratio_max,
            "neg_floor_tokens": neg_floor_tokens,
            "neg_floor_frac": neg_floor_tokens / num_neg.clamp_min(1.0),
            "clip_tokens": clip_tokens,
            "clip_frac": clip_tokens / num.clamp_min(1.0),
            "adv_mean": adv_sum / num.clamp_min(1.0),
            "num_groups": num_groups,
        }
    return loss, stats
