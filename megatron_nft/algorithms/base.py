"""What an algorithm is: the protocol every policy loss implements, the options a loss takes and the
prepared tensors it sees. One algorithm (or a small family) per module in this package; the registry
finds them. Pure torch, no Megatron."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
from torch import Tensor

from megatron_nft.algorithms.groups import RHAT_CLAMP
from megatron_nft.algorithms.stats import LossStats

# token_sum_norm: Σ ℓ / agg_norm (per-token or per-answer ℓ: additive over row splits); token_mean: the
# per-token losses' mean; group_mean: the mean of per-prompt (group) losses.
AGGREGATIONS = ("token_sum_norm", "token_mean", "group_mean")
# The official NFT code computes R = exp(min(log R, 10)): no gradient from a token beyond it.
MAX_LOG_RATIO = 10.0
# The group std of GRPO/DAPO's advantage: verl's torch.std (Bessel-corrected, K - 1) or the population's (K).
ADV_STDS = ("unbiased", "population")


def check_number(name: str, value: float, *, low: float, low_inclusive: bool, high: float = math.inf) -> None:
    """Raise ValueError naming the argument unless ``value`` is a finite number in the range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_inclusive else value > low) and value < high
    if not ok:
        lo = f"[{low}" if low_inclusive else f"({low}"
        raise ValueError(f"{name} must be a finite number in {lo}, {high}); got {value!r}")


@dataclass(frozen=True)
class LossOptions:
    """The keyword options of policy_loss (see its docstring); each algorithm reads the ones it uses."""

    prompt_weight: str | None = None
    neg_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    agg: str = "token_sum_norm"
    agg_norm: float = 1000.0
    group_size: int | None = None
    beta: float = 0.1
    sft_coef: float = 0.0
    target_temperature: float = 0.0
    adv_std: str = "unbiased"
    max_log_ratio: float | None = MAX_LOG_RATIO
    rhat_clamp: float = RHAT_CLAMP

    @classmethod
    def from_config(cls, algo: Any, **override: Any) -> "LossOptions":
        """The options of a resolved `config.AlgoConfig` (its field names; ε is `eps`)."""
        return cls(
            prompt_weight=algo.prompt_weight, neg_clip=algo.eps, clip_low=algo.clip_low, clip_high=algo.clip_high,
            agg=algo.agg, agg_norm=algo.agg_norm, beta=algo.beta, sft_coef=algo.sft_coef,
            target_temperature=algo.target_temperature, adv_std=algo.adv_std, max_log_ratio=algo.max_log_ratio,
            rhat_clamp=algo.rhat_clamp,
        ).replace(**override)

    def replace(self, **changes: Any) -> "LossOptions":
        return dataclasses.replace(self, **changes)

    def kwargs(self) -> dict[str, Any]:
        """As policy_loss's keyword arguments (the same names)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class LossInputs:
    """One (micro-)batch as every loss sees it, in the loss dtype (fp32 at least). Masked positions
    have log R = 0 (R = 1): padding log-probs can be anything, and 0·inf would be NaN."""

    logprobs: Tensor  # [B, T] log π_θ (carries the gradient)
    log_ratio: Tensor  # [B, T] log π_θ - log π_old, 0 where not valid
    ratio: Tensor  # [B, T] exp(log_ratio)
    valid: Tensor  # [B, T] bool: mask > 0
    weight: Tensor  # [B, T] the mask as a weight, 0 where not valid
    rewards: Tensor  # [B] r (detached)
    correct_rate: Tensor  # [B] r̂ (detached)
    reward_std: Tensor | None  # [B] population std of each group's rewards, or None (binary rewards)
    pos: Tensor  # [B, T] valid tokens of responses with r > 0.5
    neg: Tensor  # [B, T] valid tokens of the others

    @property
    def dtype(self) -> torch.dtype:
        return self.log_ratio.dtype

    def token_sum(self, per_token: Tensor, options: LossOptions) -> Tensor:
        """Σ mask·ℓ over the batch divided as the aggregation says (token_sum_norm or token_mean)."""
        total = (self.weight * per_token).sum()
        norm = options.agg_norm if options.agg == "token_sum_norm" else self.weight.sum().detach().clamp_min(1.0)
        return total / norm


class Algorithm:
    """A policy loss and the settings that belong to it. Subclasses set the class attributes and
    implement ``loss``; one module-level instance makes it an algorithm (the registry collects them)."""

    name: ClassVar[str]
    # The loss is per answer (or per prompt), not a sum of per-token terms: token weights (TIS) and a
    # per-token mean mean nothing for it.
    sequence_level: ClassVar[bool] = False
    # The loss couples the K answers of a prompt: it needs whole groups in one call (the actor keeps
    # them in one micro-batch, or splits the step; see Actor.train_step).
    couples_group: ClassVar[bool] = False
    # The aggregations that mean something for it; the first is its default.
    aggregations: ClassVar[tuple[str, ...]] = ("token_sum_norm", "token_mean")
    dynamic_sampling: ClassVar[bool] = True  # default of algo.dynamic_sampling
    default_prompt_weight: ClassVar[str | None] = None  # ω(q) when algo.prompt_weight is null (None: takes none)
    shaped_rewards: ClassVar[bool] = False  # accepts non-binary rewards (DAPO's over-long shaping)
    overlong_buffer_fraction: ClassVar[float] = 0.0  # default reward.overlong_buffer / rollout.max_new_tokens

    @property
    def default_agg(self) -> str:
        return self.aggregations[0]

    def check_options(self, options: LossOptions, inputs_rows: int) -> None:
        """Raise ValueError naming an option this algorithm cannot take (beyond the common checks)."""

    def config_errors(self, cfg: Any) -> Iterator[str]:
        """One-line messages for settings of a `config.TrainConfig` that mean nothing for this algorithm."""
        return iter(())

    def loss(self, x: LossInputs, options: LossOptions) -> tuple[Tensor, LossStats]:
        """The loss of the batch (with its gradient) and its statistics."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<algorithm {self.name}>"
