"""Iterative DPO as InfoNCA over the K answers of a prompt, with π_old as the reference:

    ℓ_g = -Σ_k p_k·log softmax_k(β·Δ) + λ·Σ_k p_k·(-Σ_t log π_θ)/|y_k|,   Δ_k = Σ_t log R_t of answer k,

p = infonca_targets(r). Groups with no valid token (padding) are left out. At K = 2 with one right
answer and λ = 0 this is DPO's -log σ(β(Δ_w - Δ_l)). The one loss that couples a prompt's answers:
rows [g*K, (g+1)*K) form group g and every call holds whole groups."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor

from megatron_nft.algorithms.base import Algorithm, LossInputs, LossOptions, check_number
from megatron_nft.algorithms.stats import LossStats, token_stats


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


class InfoNCA(Algorithm):
    name = "infonca"
    sequence_level = True
    couples_group = True
    aggregations = ("group_mean", "token_sum_norm")
    dynamic_sampling = True

    def check_options(self, options: LossOptions, rows: int | None) -> None:
        k = options.group_size
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"group_size must be an int >= 2 for infonca (it contrasts the K answers of a prompt); got {k!r}")
        if rows is not None and rows % k:
            raise ValueError(f"infonca needs whole groups: {rows} rows is not a multiple of group_size={k}")
        check_number("beta", options.beta, low=0.0, low_inclusive=False)
        check_number("sft_coef", options.sft_coef, low=0.0, low_inclusive=True)
        check_number("target_temperature", options.target_temperature, low=0.0, low_inclusive=True)

    def config_errors(self, cfg: Any) -> Iterator[str]:
        a, k = cfg.algo, cfg.rollout.samples_per_prompt
        if k < 2:
            yield f"rollout.samples_per_prompt={k}: algo.name={self.name} contrasts the answers of a prompt and needs K >= 2"
        if not a.beta > 0:
            yield f"algo.beta={a.beta}: must be > 0"
        if not a.sft_coef >= 0:
            yield f"algo.sft_coef={a.sft_coef}: must be >= 0"
        if not a.target_temperature >= 0:
            yield f"algo.target_temperature={a.target_temperature}: must be >= 0"

    def loss(self, x: LossInputs, options: LossOptions) -> tuple[Tensor, LossStats]:
        k = options.group_size
        seq_log_ratio = (x.weight * x.log_ratio).sum(dim=1).view(-1, k)  # Δ_k
        lengths = x.weight.sum(dim=1).view(-1, k)
        group_valid = lengths.sum(dim=1) > 0
        targets = infonca_targets(x.rewards.view(-1, k), options.target_temperature)
        contrast = -(targets * torch.log_softmax(options.beta * seq_log_ratio, dim=-1)).sum(dim=-1)
        nll = -(x.weight * torch.where(x.valid, x.logprobs, 0.0)).sum(dim=1).view(-1, k) / lengths.clamp_min(1.0)
        sft = (targets * nll).sum(dim=-1)
        group_losses = torch.where(group_valid, contrast + options.sft_coef * sft, 0.0)
        num_groups = group_valid.sum().to(x.dtype)
        norm = options.agg_norm if options.agg == "token_sum_norm" else num_groups.clamp_min(1.0)
        loss = group_losses.sum() / norm
        return loss, LossStats(**token_stats(loss, x.ratio, x.valid, x.pos, x.neg, num_groups=num_groups))


ALGORITHM = InfoNCA()
